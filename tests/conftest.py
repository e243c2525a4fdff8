"""Fixtures: seeding, session reset, a saved tiny Llama and a tiny text cache.

Helpers (models, tokenizer, oneshot runner) are in ``tests/testing_utils.py``.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.testing_utils import make_model, save_model


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    yield
    from llmcompressor.core import active_session

    active_session().reset()


@pytest.fixture
def tiny_llama_dir(tmp_path):
    return save_model(make_model("llama"), tmp_path / "dense")


@pytest.fixture
def text_cache(tmp_path, monkeypatch):
    """A complete text-v1 cache (prepare_text only checks the manifest) of tiny
    articles in the test tokenizer's vocabulary, so nothing is downloaded."""
    root = tmp_path / "cache"
    folder = root / "text-v1"
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for split in ("wiki_train", "wiki_validation", "wiki_test", "news"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(4):
                words = [f"w{rng.randrange(252)}" for _ in range(rng.randrange(20, 80))]
                record = {"title": f"{split}-{i}", "text": " ".join(words)}
                f.write(json.dumps(record) + "\n")
    (folder / "manifest.json").write_text("{}\n")
    monkeypatch.setenv("TOMOE_CACHE_DIR", str(root))
    return root
