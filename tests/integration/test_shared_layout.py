"""The shipped shared-layout recipes end to end: a stock Qwen2-MoE checkpoint, alone
and quantized with GPTQ W4A16 in the same recipe, loaded by plain transformers."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.testing_utils import (
    fresh_process_logits,
    make_model,
    run_oneshot,
    save_model,
    shipped_recipe,
)

# hidden 128 (a multiple of the W4A16 group of 64); shared and routed widths come
# out as multiples of 64 within the 1024-wide MLP
TINY = dict(hidden=128, intermediate=1024)


def _run(tmp_path, recipe):
    dense = save_model(make_model("llama", **TINY), tmp_path / "dense")
    out = tmp_path / "out"
    recipe = shipped_recipe(tmp_path, recipe, iters=4, num_experts=4)
    return run_oneshot(dense, recipe, out), out


def _stock_logits(folder: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Logits with plain transformers in a fresh process (no plugin, no remote
    code), checking that it loads the stock class."""
    logits, loaded = fresh_process_logits(folder, x, tmp_path)
    assert loaded.endswith(".Qwen2MoeForCausalLM"), loaded
    return logits


@pytest.mark.integration
def test_shared_recipe_saves_a_stock_qwen2_moe(tmp_path):
    model, out = _run(tmp_path, "tomoe_50_shared.yaml")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert "auto_map" not in config and not list(out.glob("*.py"))
    shared = config["shared_expert_intermediate_size"]
    routed = config["moe_intermediate_size"]
    assert shared % 64 == 0 and routed % 64 == 0
    assert shared + 4 * routed <= 1024, "stored experts exceed the dense MLP"
    x = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        expected = model(x).logits
    torch.testing.assert_close(_stock_logits(out, x, tmp_path), expected)


@pytest.mark.integration
def test_shared_recipe_with_w4a16_quantizes_every_expert(tmp_path):
    model, out = _run(tmp_path, "tomoe_50_shared_w4a16.yaml")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp"
        for expert in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"{prefix}.experts.{expert}.{proj}.weight_packed" in names
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"{prefix}.shared_expert.{proj}.weight_packed" in names
        assert f"{prefix}.gate.weight" in names  # routers stay in high precision
        assert f"{prefix}.shared_expert_gate.weight" in names
        assert f"{prefix}.shared_expert_gate.weight_packed" not in names
    x = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        expected = model(x).logits
    torch.testing.assert_close(_stock_logits(out, x, tmp_path), expected)
