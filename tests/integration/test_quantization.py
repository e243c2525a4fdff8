"""ToMoE then quantization in one recipe, saved as compressed-tensors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.testing_utils import (
    assert_loads_without_plugin,
    make_model,
    run_oneshot,
    save_model,
    shipped_recipe,
)
from tomoe_modifier import ToMoESparseMLP


def _quantize(tmp_path, recipe: str):
    # hidden 128: a multiple of the recipes' group size (64)
    dense_dir = save_model(
        make_model("llama", hidden=128, intermediate=512), tmp_path / "dense"
    )
    out = tmp_path / "out"
    model = run_oneshot(dense_dir, shipped_recipe(tmp_path, recipe), out)
    return model, out


def _tensor_names(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.integration
def test_shipped_tomoe_recipe_converts_without_quantizing(tmp_path):
    model, out = _quantize(tmp_path, "tomoe_50.yaml")
    moes = [m for m in model.modules() if isinstance(m, ToMoESparseMLP)]
    assert len(moes) == 2
    assert not any(hasattr(m, "quantization_scheme") for m in model.modules())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["moe_union_sizes"] == [m.union_size for m in moes]
    assert all(m.expert_blocks.any(0).all() for m in moes)  # no padding stored


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["tomoe_50_w4a16.yaml", "tomoe_50_w8a8.yaml"])
def test_every_expert_linear_is_quantized_and_routers_are_not(tmp_path, recipe):
    model, out = _quantize(tmp_path, recipe)
    moes = [m for m in model.modules() if isinstance(m, ToMoESparseMLP)]
    assert len(moes) == 2
    for moe in moes:
        assert hasattr(moe.gate_up_proj, "quantization_scheme")
        assert hasattr(moe.down_proj, "quantization_scheme")
        assert not hasattr(moe.router, "quantization_scheme")
        if "w4a16" in recipe:  # padded to GPTQ's group size, read off the recipe
            assert moe.union_size % 64 == 0
        else:  # per-channel int8: nothing to pad
            assert moe.expert_blocks.any(0).all()

    config = json.loads((out / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors"
    assert config["model_type"] == "tomoe_llama"
    names = _tensor_names(out)
    packed = "weight_packed" if "w4a16" in recipe else "weight"
    for i in range(2):
        prefix = f"model.layers.{i}.mlp"
        for proj in ("gate_up_proj", "down_proj"):
            assert f"{prefix}.{proj}.{packed}" in names
            assert f"{prefix}.{proj}.weight_scale" in names
        assert f"{prefix}.router.weight" in names
        assert f"{prefix}.router.weight_scale" not in names


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["tomoe_50_w4a16.yaml", "tomoe_50_w8a8.yaml"])
def test_reload_gives_the_in_memory_quantized_logits(tmp_path, recipe):
    model, out = _quantize(tmp_path, recipe)
    x = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        expected = model(x).logits
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        assert type(reloaded).__name__ == "ToMoELlamaForCausalLM"
        torch.testing.assert_close(reloaded(x).logits, expected)
    torch.save({"x": x, "logits": expected}, tmp_path / "expected.pt")
    assert_loads_without_plugin(out, tmp_path / "expected.pt")


@pytest.mark.integration
def test_no_expert_channel_is_left_without_calibration(tmp_path):
    # GPTQ zeroes weight columns whose Hessian diagonal is 0 (no calibration signal);
    # with the calibrate-all-experts flag every union channel sees every token.
    model, _ = _quantize(tmp_path, "tomoe_50_w4a16.yaml")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        reloaded(torch.randint(4, 256, (1, 4)))  # first forward decompresses
    for moe in (m for m in reloaded.modules() if isinstance(m, ToMoESparseMLP)):
        weight = moe.down_proj.weight
        assert (weight.abs().sum(dim=0) > 0).all(), "a down_proj column was zeroed"


@pytest.mark.integration
def test_saved_quantization_recipe_loads_back_and_reruns(tmp_path):
    from llmcompressor.core import active_session

    _, out = _quantize(tmp_path, "tomoe_50_w4a16.yaml")
    saved = out / "recipe.yaml"
    text = saved.read_text()
    assert "ToMoEModifier" in text and "GPTQModifier" in text
    active_session().reset()
    model = run_oneshot(str(tmp_path / "dense"), str(saved))
    moes = [m for m in model.modules() if isinstance(m, ToMoESparseMLP)]
    assert moes and all(hasattr(m.down_proj, "quantization_scheme") for m in moes)
