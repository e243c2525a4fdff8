"""oneshot end to end on tiny random models: train, convert, save, reload."""

import json
from pathlib import Path

import pytest
import torch
from llmcompressor.core import active_session
from transformers import AutoModelForCausalLM

from tests.testing_utils import (
    FAST,
    assert_loads_without_plugin,
    make_model,
    run_oneshot,
    save_model,
)
from tomoe_modifier import ToMoEModifier, ToMoESparseMLP


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_oneshot_converts_saves_and_reloads(tmp_path, family):
    dense_dir = save_model(make_model(family), tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    report = tmp_path / "report.json"
    modifier = ToMoEModifier(target_active_ratio=0.6, report_path=str(report), **FAST)
    model = run_oneshot(dense_dir, [modifier], tmp_path / "out")

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
    assert config["num_experts_per_tok"] == 1
    assert "auto_map" in config
    assert (tmp_path / "out" / "modeling_tomoe.py").exists()

    x = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        expected = model(x).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert type(reloaded).__name__ == type(model).__name__
        torch.testing.assert_close(reloaded(x).logits, expected)


def _file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges of ``path`` mapped into this process (Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_bfloat16_load_keeps_fp32_routers_and_releases_the_file(tmp_path):
    """A float32 checkpoint loaded in bfloat16: the routers stay float32 (as
    trained) and no tensor left uncast by the load keeps the mapped file resident
    (a view of it pinned all of it: 525 MiB more than dense on SmolLM2)."""
    dense_dir = save_model(make_model("llama"), tmp_path / "dense")
    run_oneshot(dense_dir, [ToMoEModifier(**FAST)], tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    moes = [m for m in model.modules() if isinstance(m, ToMoESparseMLP)]
    assert all(m.router.weight.dtype == torch.float32 for m in moes)
    assert all(m.gate_up_proj.weight.dtype == torch.bfloat16 for m in moes)
    mapped = _file_mappings((tmp_path / "out" / "model.safetensors").resolve())
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t._base is None for t in tensors)
    pinned = [
        t.shape
        for t in tensors
        if any(a <= t.untyped_storage().data_ptr() < b for a, b in mapped)
    ]
    assert not pinned


@pytest.mark.integration
def test_checkpoint_loads_without_the_plugin(tmp_path, tiny_llama_dir):
    model = run_oneshot(tiny_llama_dir, [ToMoEModifier(**FAST)], tmp_path / "out")
    x = torch.randint(4, 256, (1, 9))
    with torch.no_grad():
        torch.save({"x": x, "logits": model(x).logits}, tmp_path / "expected.pt")
    assert_loads_without_plugin(tmp_path / "out", tmp_path / "expected.pt")


@pytest.mark.integration
def test_yaml_recipe_and_saved_recipe_round_trip(tmp_path, tiny_llama_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "tomoe_stage:\n  tomoe_modifiers:\n    ToMoEModifier:\n"
        + "".join(f"      {k}: {v}\n" for k, v in FAST.items())
    )
    run_oneshot(tiny_llama_dir, str(recipe), tmp_path / "out")
    saved = tmp_path / "out" / "recipe.yaml"
    assert "ToMoEModifier" in saved.read_text()
    active_session().reset()
    model = run_oneshot(tiny_llama_dir, str(saved), tmp_path / "out2")
    assert any(isinstance(m, ToMoESparseMLP) for m in model.modules())


@pytest.mark.integration
def test_training_is_seeded(tiny_llama_dir):
    x = torch.randint(4, 256, (2, 12))
    outputs = []
    for _ in range(2):
        active_session().reset()
        model = run_oneshot(tiny_llama_dir, [ToMoEModifier(seed=3, **FAST)])
        with torch.no_grad():
            outputs.append(model(x).logits)
    torch.testing.assert_close(outputs[0], outputs[1])


@pytest.mark.integration
def test_attention_pruning_and_expert_bias_end_to_end(tmp_path):
    dense_dir = save_model(make_model("llama", head_dim=16), tmp_path / "dense")
    modifier = ToMoEModifier(
        attention_pruning=True, expert_bias=True, target_active_ratio=0.55, **FAST
    )
    model = run_oneshot(dense_dir, [modifier], tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["moe_expert_bias"] is True
    assert len(config["moe_qk_dims"]) == 2
    assert modifier.report["qk_dims"] == config["moe_qk_dims"]
    x = torch.randint(4, 256, (1, 9))
    with torch.no_grad():
        torch.save({"x": x, "logits": model(x).logits}, tmp_path / "expected.pt")
    assert_loads_without_plugin(tmp_path / "out", tmp_path / "expected.pt")


@pytest.mark.integration
def test_teacher_cache_hidden_term_and_windows(tmp_path, tiny_llama_dir):
    modifier = ToMoEModifier(
        teacher_cache="sampled",
        teacher_samples=8,
        hidden_distill_weight=0.5,
        train_window=16,
        long_window_every=2,
        **{**FAST, "epochs": 3},
    )
    run_oneshot(tiny_llama_dir, [modifier], batch_size=16)
    report = modifier.report
    # one batch of 16 rows, drawn 3 times: the long-window steps repeat the rows
    assert report["teacher_cache_hits"] >= 1
    assert all(r["hidden"] > 0 for r in report["history"])
