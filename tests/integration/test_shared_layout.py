"""The shipped shared-layout recipes end to end: a stock Qwen2-MoE checkpoint, alone
and quantized with GPTQ W4A16 in the same recipe, loaded by plain transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.testing_utils import make_model, run_oneshot, save_model, shipped_recipe

# hidden 128 (a multiple of the W4A16 group of 64); shared and routed widths come
# out as multiples of 64 within the 1024-wide MLP
TINY = dict(hidden=128, intermediate=1024)


def _run(tmp_path, recipe):
    dense = save_model(make_model("llama", **TINY), tmp_path / "dense")
    out = tmp_path / "out"
    recipe = shipped_recipe(tmp_path, recipe, iters=4, num_experts=4)
    return run_oneshot(dense, recipe, out), out


def _stock_logits(folder: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Logits of ``folder`` loaded in a fresh process with plain transformers: no
    tomoe_modifier, no trust_remote_code."""
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(folder)!r})
assert "tomoe_modifier" not in sys.modules
assert type(m).__name__ == "Qwen2MoeForCausalLM", type(m).__name__
with torch.no_grad():
    torch.save(m(torch.load({str(tmp_path / "x.pt")!r})).logits,
               {str(tmp_path / "stock.pt")!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "stock.pt")


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
