"""Offline checks of the asset helpers: packing, splits, wiki parsing, the cache."""

from __future__ import annotations

import bz2
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, pre_tokenizers, processors  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from tomoe_modifier.assets.cache import atomic_dir  # noqa: E402
from tomoe_modifier.assets.calibration import build_calibration_dataset  # noqa: E402
from tomoe_modifier.assets.text import (  # noqa: E402
    SPLITS,
    clean_wikitext,
    iter_wiki_articles,
    load_split,
    split_articles,
)

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<unk>", "<pad>", "<bos>", "<eos>"]


def make_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
    )


def make_texts(n: int, seed: int = 0, min_len: int = 3, max_len: int = 40):
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(0, len(WORDS), (length,), generator=gen)
        texts.append(" ".join(WORDS[i] for i in ids))
    return texts


@pytest.mark.unit
def test_calibration_shapes_count_and_eos_separators():
    tok = make_tokenizer()
    texts = make_texts(30)
    total = sum(len(t.split()) + 1 for t in texts)  # words + one eos per text
    ds = build_calibration_dataset(tok, texts, seq_len=16)
    assert ds.column_names == ["input_ids", "attention_mask"]
    assert len(ds) == total // 16
    rows = ds["input_ids"]
    assert all(len(r) == 16 for r in rows)
    assert all(m == [1] * 16 for m in ds["attention_mask"])
    stream = []  # packing adds no BOS, just the words and an eos after each text
    for text in texts:
        stream += tok.convert_tokens_to_ids(text.split()) + [tok.eos_token_id]
    expected = [stream[i : i + 16] for i in range(0, len(ds) * 16, 16)]
    assert sorted(rows) == sorted(expected)


@pytest.mark.unit
def test_calibration_num_samples_is_seeded_subset():
    tok = make_tokenizer()
    texts = make_texts(30)
    full = build_calibration_dataset(tok, texts, seq_len=8, seed=3)
    a = build_calibration_dataset(tok, texts, seq_len=8, num_samples=5, seed=3)
    b = build_calibration_dataset(tok, texts, seq_len=8, num_samples=5, seed=3)
    c = build_calibration_dataset(tok, texts, seq_len=8, num_samples=5, seed=4)
    assert len(a) == 5 and a["input_ids"] == b["input_ids"]
    assert a["input_ids"] == full["input_ids"][:5]
    assert a["input_ids"] != c["input_ids"]
    assert sorted(map(tuple, full["input_ids"])) == sorted(
        map(
            tuple, build_calibration_dataset(tok, texts, seq_len=8, seed=9)["input_ids"]
        )
    )


@pytest.mark.unit
def test_calibration_errors_on_empty_or_too_short():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="no non-empty texts"):
        build_calibration_dataset(tok, [], seq_len=8)
    with pytest.raises(ValueError, match="no non-empty texts"):
        build_calibration_dataset(tok, ["", "  "], seq_len=8)
    with pytest.raises(ValueError, match="produced 0 sequences of 512 tokens from 2"):
        build_calibration_dataset(tok, ["w1 w2", "w3"], seq_len=512)


@pytest.mark.unit
def test_load_split_bad_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="wiki_train") as err:
        load_split("train", cache=tmp_path)
    assert all(name in str(err.value) for name in SPLITS)
    assert list(tmp_path.iterdir()) == []  # rejected before any download


@pytest.mark.unit
def test_split_articles_is_deterministic_disjoint_80_10_10():
    titles = [f"Article {i}" for i in range(100)]
    a = split_articles(titles)
    b = split_articles(list(reversed(titles)))
    assert a == b
    assert [len(a[k]) for k in ("wiki_train", "wiki_validation", "wiki_test")] == [
        80,
        10,
        10,
    ]
    assert sorted(sum(a.values(), [])) == sorted(titles)


@pytest.mark.unit
def test_wiki_dump_parsing_skips_redirects_and_namespaces(tmp_path):
    ns = "http://www.mediawiki.org/xml/export-0.10/"

    def page(title, ns_id, text, redirect=False):
        red = f'<redirect title="{title}x" />' if redirect else ""
        return (
            f"<page><title>{title}</title><ns>{ns_id}</ns>{red}"
            f"<revision><text>{text}</text></revision></page>"
        )

    body = "".join(
        [
            page(
                "Real",
                0,
                "'''Real''' is [[Word|a word]].&lt;ref&gt;cite&lt;/ref&gt;"
                "\n[[Category:Things]]\n== See also ==\n* [[Other]]",
            ),
            page("Gone", 0, "#REDIRECT [[Real]]", redirect=True),
            page("Wikipedia:Help", 4, "help text"),
            page("Blank", 0, ""),
        ]
    )
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(
        bz2.compress(f'<mediawiki xmlns="{ns}">{body}</mediawiki>'.encode())
    )
    stats: dict[str, int] = {}
    articles = list(iter_wiki_articles(path, stats))
    assert [title for title, _ in articles] == ["Real"]
    assert stats == {
        "pages": 4,
        "redirects": 1,
        "other_namespace": 1,
        "empty": 1,
        "articles": 1,
    }
    assert clean_wikitext(articles[0][1]) == "Real is a word."


@pytest.mark.unit
def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (final / "done.txt").read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
