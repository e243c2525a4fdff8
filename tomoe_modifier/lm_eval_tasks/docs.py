"""Documents of the tomoe_* lm-eval tasks, loaded from the project's text cache.

The cache lives in a machine-dependent folder (``TOMOE_CACHE_DIR`` or
``~/.cache/tomoe_modifier``), so the task YAMLs cannot name a path; they point
``custom_dataset`` here instead, and ``prepare_text()`` builds the cache on a fresh
machine. lm-eval calls these with the task metadata and model arguments as keyword
arguments, which are not needed and are ignored.
"""

from __future__ import annotations

import json

__all__ = ["load_docs", "news", "wiki_test", "wiki_validation"]


def load_docs(split: str):
    """DatasetDict with one ``test`` split of {"title", "text"} rows of ``split``."""
    import datasets

    from tomoe_modifier.assets.text import SPLITS, prepare_text

    if split not in SPLITS:
        raise ValueError(f"unknown text split {split!r}; valid names are {SPLITS}")
    path = prepare_text() / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [{"title": r["title"], "text": r["text"]} for r in rows if r["text"].strip()]
    if not rows:
        raise ValueError(
            f"{path} has no non-empty article; delete its folder and call "
            "tomoe_modifier.assets.prepare_text() to rebuild it"
        )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def wiki_test(**_ignored):
    """Held-out Wikipedia articles (split by article from the calibration text)."""
    return load_docs("wiki_test")


def wiki_validation(**_ignored):
    """Held-out Wikipedia validation articles (tuning and ablations)."""
    return load_docs("wiki_validation")


def news(**_ignored):
    """Lee news corpus articles: out of the calibration domain."""
    return load_docs("news")
