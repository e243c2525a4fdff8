"""Real English text for calibration and evaluation, taken from the gensim wheel.

The gensim wheel on PyPI carries two small real corpora as test data: a shortened
English Wikipedia dump (206 pages of raw wikitext) and the Lee news corpus (300
articles). They are reachable wherever pip is, so no dataset hub is needed.
Wikipedia articles are cleaned to plain text and split by article into
train/validation/test so that no article leaks across splits.
"""

from __future__ import annotations

import bz2
import json
import random
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

from tomoe_modifier.assets.cache import (
    atomic_dir,
    cache_dir,
    download_wheel,
    extract_member,
    require_extra,
)

__all__ = [
    "MIN_ARTICLE_CHARS",
    "SPLITS",
    "clean_wikitext",
    "iter_wiki_articles",
    "load_split",
    "prepare_text",
    "split_articles",
]

SPLITS = ("wiki_train", "wiki_validation", "wiki_test", "news")
MIN_ARTICLE_CHARS = 200
SPLIT_SEED = 20240601
_TEXT_DIRNAME = "text-v1"
# Pinned to one exact wheel so every machine gets byte-identical source files.
_GENSIM = "gensim==4.4.0"
_GENSIM_PLATFORM = tuple(
    "--platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp "
    "--abi cp311".split()
)
_DATA = "gensim/test/test_data/"
_WIKI_MEMBER = (
    _DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
_NEWS_MEMBER = _DATA + "lee_background.cor"

# Markup whose content is not running prose (citations, formulas, galleries...).
_DROP_TAGS = frozenset(
    "ref references gallery math timeline imagemap score syntaxhighlight source "
    "code chem hiero graph nowiki".split()
)
# Trailing sections that are lists of links/citations rather than text.
_TAIL_SECTIONS = frozenset(
    [
        *"references notes bibliography sources footnotes citations".split(),
        *["external links", "see also", "further reading", "notes and references"],
    ]
)
_LINK_NAMESPACES = frozenset({"category", "file", "image", "media"})
_HEADING = re.compile(r"^(={2,6})\s*(.+?)\s*\1\s*(?:<!--.*?-->\s*)*$", re.MULTILINE)
_INTERWIKI = re.compile(r"^:?[a-z][a-z\-]{1,11}:")


def clean_wikitext(raw: str) -> str:
    """Wikitext -> plain text: drop citations, files, categories and link sections."""
    require_extra("mwparserfromhell", "assets")
    import mwparserfromhell

    for match in _HEADING.finditer(raw):
        if match.group(2).strip("' ").lower() in _TAIL_SECTIONS:
            raw = raw[: match.start()]
            break
    code = mwparserfromhell.parse(raw)
    _prune(code)
    text = code.strip_code()
    text = re.sub(r"\s*\(\s*[,;]*\s*\)", "", text)  # "()" left by removed templates
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _prune(code) -> None:
    """Drop unwanted nodes in one pass (Wikicode.remove is a slow global search)."""
    from mwparserfromhell import nodes as mw

    kept = []
    for node in code.nodes:
        if isinstance(node, mw.Tag):
            if str(node.tag).strip().lower() in _DROP_TAGS:
                continue
            children = [node.contents]
        elif isinstance(node, mw.Wikilink):
            title = str(node.title).strip().lower()
            prefix = title.lstrip(":").split(":", 1)[0].strip() if ":" in title else ""
            if prefix in _LINK_NAMESPACES or _INTERWIKI.match(title):
                continue
            children = [node.text]
        elif isinstance(node, (mw.Heading, mw.ExternalLink)):
            children = [node.title]
        else:  # templates, comments, ... are dropped whole by strip_code
            children = []
        for child in children:
            if child is not None:
                _prune(child)
        kept.append(node)
    code.nodes = kept


def iter_wiki_articles(
    path: Path, stats: dict[str, int] | None = None
) -> Iterator[tuple[str, str]]:
    """Yield (title, raw wikitext) of main-namespace, non-redirect, non-empty pages.

    ``stats``, if given, is filled with counts of pages seen and skipped.
    """
    counts = stats if stats is not None else {}
    for key in ("pages", "redirects", "other_namespace", "empty", "articles"):
        counts.setdefault(key, 0)
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            title = (elem.findtext("{*}title") or "").strip()
            ns = (elem.findtext("{*}ns") or "").strip()
            redirect = elem.find("{*}redirect") is not None
            raw = elem.findtext("{*}revision/{*}text") or ""
            elem.clear()
            counts["pages"] += 1
            if ns != "0":
                counts["other_namespace"] += 1
            elif redirect or raw.lstrip().lower().startswith("#redirect"):
                counts["redirects"] += 1
            elif not title or not raw.strip():
                counts["empty"] += 1
            else:
                counts["articles"] += 1
                yield title, raw


def split_articles(titles: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Deterministic 80/10/10 split of titles (seeded shuffle of the sorted titles)."""
    order = sorted(titles)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val = n_test = round(0.1 * n)
    return {
        "wiki_validation": order[:n_val],
        "wiki_test": order[n_val : n_val + n_test],
        "wiki_train": order[n_val + n_test :],
    }


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def prepare_text(cache: Path | None = None) -> Path:
    """Build (once) and return the folder with the text splits and a manifest."""
    root = Path(cache) if cache is not None else cache_dir()
    final = root / _TEXT_DIRNAME
    if (final / "manifest.json").is_file():
        return final
    t_start = time.perf_counter()
    with atomic_dir(final) as tmp:
        work = tmp / ".download"
        wheel = download_wheel(_GENSIM, work, extra_args=_GENSIM_PLATFORM)
        wiki_path = extract_member(wheel, _WIKI_MEMBER, work)
        news_path = extract_member(wheel, _NEWS_MEMBER, work)
        wheel.unlink()

        t0 = time.perf_counter()
        page_stats: dict[str, int] = {}
        raw = list(iter_wiki_articles(wiki_path, page_stats))
        cleaned = {title: clean_wikitext(text) for title, text in raw}
        kept = {t: s for t, s in cleaned.items() if len(s) >= MIN_ARTICLE_CHARS}
        logger.info(
            "parsed {} wiki pages: {} articles, kept {} with >= {} chars in {:.1f}s",
            page_stats["pages"],
            len(raw),
            len(kept),
            MIN_ARTICLE_CHARS,
            time.perf_counter() - t0,
        )
        if not kept:
            raise RuntimeError(f"no usable article found in {wiki_path.name}")

        splits = {
            name: [{"title": t, "text": kept[t]} for t in sorted(titles)]
            for name, titles in split_articles(list(kept)).items()
        }
        lines = news_path.read_text(encoding="utf-8").splitlines()
        news = [re.sub(r"\s+", " ", line).strip() for line in lines]
        splits["news"] = [
            {"title": f"news-{i}", "text": text}
            for i, text in enumerate(t for t in news if t)
        ]
        manifest = {
            "format": 1,
            "source": f"PyPI wheel {_GENSIM}",
            "wiki_member": _WIKI_MEMBER,
            "news_member": _NEWS_MEMBER,
            "wiki_pages": page_stats,
            "wiki_dropped_short": len(raw) - len(kept),
            "min_article_chars": MIN_ARTICLE_CHARS,
            "split_seed": SPLIT_SEED,
            "splits": {},
        }
        for name in SPLITS:
            records = splits[name]
            _write_jsonl(tmp / f"{name}.jsonl", records)
            manifest["splits"][name] = {
                "articles": len(records),
                "chars": sum(len(r["text"]) for r in records),
            }
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    summary = ", ".join(f"{k}={v['articles']}" for k, v in manifest["splits"].items())
    logger.info(
        "text ready at {} ({}) in {:.1f}s",
        final,
        summary,
        time.perf_counter() - t_start,
    )
    return final


def load_split(name: str, cache: Path | None = None) -> list[str]:
    """Texts of one split, preparing the cache first if needed."""
    if name not in SPLITS:
        raise ValueError(f"unknown text split {name!r}; valid names are {SPLITS}")
    folder = prepare_text(cache)
    with open(folder / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]
