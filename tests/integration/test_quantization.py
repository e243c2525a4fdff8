"""ToMoE then quantization in one recipe, saved as compressed-tensors."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_loads_without_plugin, make_dataset, make_model, save_model
from llmcompressor import oneshot
from llmcompressor.modeling.moe.context import moe_calibration_context
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import tomoe_modifier  # noqa: F401
from tomoe_modifier import ToMoESparseMLP

RECIPES = Path(__file__).parents[2] / "recipes"


def shipped_recipe(tmp_path, name: str, iters: int = 4) -> str:
    """A recipe of recipes/ as shipped, with fewer ToMoE steps for a tiny model."""
    recipe = yaml.safe_load((RECIPES / name).read_text())
    recipe["tomoe_stage"]["tomoe_modifiers"]["ToMoEModifier"]["iters"] = iters
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))  # keep stage order
    return str(path)


def _quantize(tmp_path, recipe: str):
    # hidden 128: a multiple of the recipes' group size (64)
    dense_dir = save_model(
        make_model("llama", hidden=128, intermediate=512), tmp_path / "dense"
    )
    out = tmp_path / "out"
    model = oneshot(
        model=dense_dir,
        dataset=make_dataset(num_samples=16, seq_len=32),
        recipe=shipped_recipe(tmp_path, recipe),
        max_seq_length=32,
        num_calibration_samples=16,
        batch_size=4,
        output_dir=str(out),
    )
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
    assert all(u % 64 == 0 for u in config["moe_union_sizes"])


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


@pytest.mark.unit
def test_calibration_flag_shows_down_proj_every_channel():
    from tomoe_modifier.convert import build_sparse_mlp
    from tomoe_modifier.mappings import MLPLayout

    dense = make_model("llama").model.layers[0].mlp
    masks = torch.zeros(4, 8, dtype=torch.bool)
    masks[torch.arange(4), torch.arange(4)] = True  # disjoint one-block experts
    moe = build_sparse_mlp(
        dense, MLPLayout(), torch.nn.Linear(64, 4, bias=False), masks, 16, "silu"
    )
    seen = []
    moe.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = torch.randn(6, 64)
    routed = moe(x)
    with moe_calibration_context():
        calibrated = moe(x)
    torch.testing.assert_close(calibrated, routed)
    assert (seen[-1] != 0).all(), "observers must see every channel on every token"


@pytest.mark.integration
def test_saved_quantization_recipe_loads_back_and_reruns(tmp_path):
    from llmcompressor.core import active_session

    _, out = _quantize(tmp_path, "tomoe_50_w4a16.yaml")
    saved = out / "recipe.yaml"
    text = saved.read_text()
    assert "ToMoEModifier" in text and "GPTQModifier" in text
    active_session().reset()
    model = oneshot(
        model=str(tmp_path / "dense"),
        dataset=make_dataset(num_samples=16, seq_len=32),
        recipe=str(saved),
        max_seq_length=32,
        num_calibration_samples=16,
        batch_size=4,
    )
    moes = [m for m in model.modules() if isinstance(m, ToMoESparseMLP)]
    assert moes and all(hasattr(m.down_proj, "quantization_scheme") for m in moes)
