"""Tiny random models, an offline tokenizer and calibration data, built per test."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, pre_tokenizers  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB_SIZE = 256
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    words = specials + [f"w{i}" for i in range(VOCAB_SIZE - len(specials))]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def make_model(
    family: str = "llama",
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    # random init is tiny; widen it so routing and masking have visible effects
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def save_model(model, path) -> str:
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def make_dataset(num_samples: int = 16, seq_len: int = 32, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB_SIZE, (num_samples, seq_len), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * num_samples}
    )


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


def assert_loads_without_plugin(out, expected_pt) -> None:
    """Load ``out`` with trust_remote_code in a fresh process that never imports
    tomoe_modifier, and compare its logits with ``expected_pt`` ({"x", "logits"})."""
    tmp = Path(expected_pt).parent
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
assert "tomoe_modifier" not in sys.modules, "plugin must not be imported"
e = torch.load({str(expected_pt)!r})
with torch.no_grad():
    torch.testing.assert_close(m(e["x"]).logits, e["logits"])
print("OK", type(m).__module__)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK transformers_modules" in result.stdout
