"""Helpers shared by the tests: tiny random models, an offline tokenizer, one
oneshot runner and one set of fast ToMoE settings.

Import as ``from tests.testing_utils import ...`` (llm-compressor's convention);
fixtures live in ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
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

import tomoe_modifier  # noqa: E402,F401  (registers ToMoEModifier for YAML recipes)

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
VOCAB_SIZE = 256
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
# ToMoE settings that train a tiny model in a second or two (2 passes over 4 batches)
FAST = dict(num_experts=4, width_multiple=16, epochs=2, lr=2e-2, log_every=4)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over "w0".."w251" plus 4 specials, built in memory (no
    hub; not a Qwen2Tokenizer, which would drop a WordLevel vocabulary)."""
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
    vocab_size: int = VOCAB_SIZE,
    **config_kwargs,
):
    """A tiny random decoder of ``family`` whose weights and biases are wide enough
    (std 0.08) that routing and masking change its logits visibly."""
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        **{"tie_word_embeddings": False, **config_kwargs},
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("bias"):  # qwen2's q/k/v biases
                p.normal_(0, 0.08)
    return model.eval()


def save_model(model, path) -> str:
    """Save ``model`` with the test tokenizer (oneshot needs a loadable folder)."""
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def make_dataset(num_samples: int = 16, seq_len: int = 32, seed: int = 0) -> Dataset:
    """Pre-tokenized random calibration rows of the test vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB_SIZE, (num_samples, seq_len), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * num_samples}
    )


def run_oneshot(model, recipe, out=None, *, dataset=None, seq_len=32, **kwargs):
    """oneshot on the tiny calibration set: 16 samples of ``seq_len`` tokens,
    batch 4; ``dataset=None`` means the default random set."""
    from llmcompressor import oneshot

    if dataset is None:
        dataset = make_dataset(seq_len=seq_len)
    return oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        max_seq_length=seq_len,
        num_calibration_samples=kwargs.pop("num_calibration_samples", 16),
        batch_size=kwargs.pop("batch_size", 4),
        output_dir=str(out) if out else None,
        **kwargs,
    )


def shipped_recipe(tmp_path, name: str, iters: int = 4, **overrides) -> str:
    """A recipe of recipes/ as shipped, with fewer ToMoE steps for a tiny model."""
    recipe = yaml.safe_load((RECIPES / name).read_text())
    fields = recipe["tomoe_stage"]["tomoe_modifiers"]["ToMoEModifier"]
    fields.update(iters=iters, **overrides)
    path = Path(tmp_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))  # keep stage order
    return str(path)


def assert_cached_decoding_matches(model, prompt: torch.Tensor, new_tokens: int):
    """Greedy decoding with the KV cache gives the logits of one full forward."""
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=1,
        )
        full = model(out.sequences).logits  # one forward, no cache
    start = prompt.shape[1] - 1
    cached = torch.stack(out.logits, dim=1)  # one token at a time
    torch.testing.assert_close(cached, full[:, start:-1], atol=1e-4, rtol=1e-4)
    assert torch.equal(out.sequences[:, start + 1 :], full[:, start:-1].argmax(-1))


def fresh_process_logits(
    folder, x: torch.Tensor, workdir, trust_remote_code: bool = False
) -> tuple[torch.Tensor, str]:
    """Logits of ``folder`` on ``x``, loaded by ``AutoModelForCausalLM`` in a fresh
    process that never imports tomoe_modifier; also the loaded class's module and
    name (``transformers_modules...`` for remote code)."""
    workdir = Path(workdir)
    torch.save(x, workdir / "fresh_x.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(
    {str(folder)!r}, trust_remote_code={trust_remote_code!r}
)
assert "tomoe_modifier" not in sys.modules, "plugin must not be imported"
# serving a checkpoint must not load llm-compressor (about 50 MiB resident)
assert "llmcompressor" not in sys.modules, "llm-compressor must not be imported"
with torch.no_grad():
    logits = m(torch.load({str(workdir / "fresh_x.pt")!r})).logits
torch.save(logits, {str(workdir / "fresh_logits.pt")!r})
print("LOADED", type(m).__module__, type(m).__name__)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("LOADED"))
    _, module, name = line.split()
    return torch.load(workdir / "fresh_logits.pt"), f"{module}.{name}"


def assert_loads_without_plugin(out, expected_pt) -> None:
    """Load ``out`` with trust_remote_code in a fresh process that never imports
    tomoe_modifier, and compare its logits with ``expected_pt`` ({"x", "logits"})."""
    expected = torch.load(expected_pt)
    logits, loaded = fresh_process_logits(
        out, expected["x"], Path(expected_pt).parent, trust_remote_code=True
    )
    assert loaded.startswith("transformers_modules"), loaded
    torch.testing.assert_close(logits, expected["logits"])
