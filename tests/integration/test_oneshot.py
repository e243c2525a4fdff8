"""oneshot end to end on tiny random models: train, convert, save, reload."""

import json

import pytest
import torch
from conftest import assert_loads_without_plugin, make_dataset, make_model, save_model
from llmcompressor import oneshot
from llmcompressor.core import active_session
from transformers import AutoModelForCausalLM

import tomoe_modifier  # noqa: F401  (registers ToMoEModifier and the architectures)
from tomoe_modifier import ToMoEModifier, ToMoESparseMLP

FAST = dict(num_experts=4, width_multiple=16, epochs=2, lr=2e-2, log_every=4)


def _run(model_dir, out_dir, recipe, **kwargs):
    return oneshot(
        model=model_dir,
        dataset=kwargs.pop("dataset", make_dataset()),
        recipe=recipe,
        max_seq_length=32,
        num_calibration_samples=16,
        batch_size=kwargs.pop("batch_size", 4),
        output_dir=str(out_dir) if out_dir else None,
        **kwargs,
    )


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_oneshot_converts_saves_and_reloads(tmp_path, family):
    dense_dir = save_model(make_model(family), tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    report = tmp_path / "report.json"
    modifier = ToMoEModifier(target_active_ratio=0.6, report_path=str(report), **FAST)
    model = _run(dense_dir, tmp_path / "out", [modifier])

    moes = [m for m in model.modules() if isinstance(m, ToMoESparseMLP)]
    assert len(moes) == 2
    # weights unchanged: every expert row is a row of the dense MLP
    dense_gate = dense.model.layers[0].mlp.gate_proj.weight
    moe_gate = moes[0].gate_up_proj.weight[0::2]
    assert all((dense_gate == row).all(-1).any() for row in moe_gate)
    history = json.loads(report.read_text())["history"]
    assert history[-1]["active_ratio"] < history[0]["active_ratio"]

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == f"tomoe_{family}"
    assert config["num_experts"] == 4 and len(config["moe_union_sizes"]) == 2
    assert "auto_map" in config
    assert (tmp_path / "out" / "modeling_tomoe.py").exists()

    x = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        expected = model(x).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert type(reloaded).__name__ == type(model).__name__
        torch.testing.assert_close(reloaded(x).logits, expected)


@pytest.mark.integration
def test_checkpoint_loads_without_the_plugin(tmp_path):
    dense_dir = save_model(make_model("llama"), tmp_path / "dense")
    model = _run(dense_dir, tmp_path / "out", [ToMoEModifier(**FAST)])
    x = torch.randint(4, 256, (1, 9))
    with torch.no_grad():
        torch.save({"x": x, "logits": model(x).logits}, tmp_path / "expected.pt")
    assert_loads_without_plugin(tmp_path / "out", tmp_path / "expected.pt")


@pytest.mark.integration
def test_yaml_recipe_and_saved_recipe_round_trip(tmp_path):
    dense_dir = save_model(make_model("llama"), tmp_path / "dense")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "tomoe_stage:\n  tomoe_modifiers:\n    ToMoEModifier:\n"
        + "".join(f"      {k}: {v}\n" for k, v in FAST.items())
    )
    _run(dense_dir, tmp_path / "out", str(recipe))
    saved = tmp_path / "out" / "recipe.yaml"
    assert "ToMoEModifier" in saved.read_text()
    active_session().reset()
    model = _run(dense_dir, tmp_path / "out2", str(saved))
    assert any(isinstance(m, ToMoESparseMLP) for m in model.modules())


@pytest.mark.integration
def test_training_is_seeded(tmp_path):
    dense_dir = save_model(make_model("llama"), tmp_path / "dense")
    x = torch.randint(4, 256, (2, 12))
    outputs = []
    for run in range(2):
        active_session().reset()
        model = _run(dense_dir, None, [ToMoEModifier(seed=3, **FAST)])
        with torch.no_grad():
            outputs.append(model(x).logits)
    torch.testing.assert_close(outputs[0], outputs[1])
