"""The layer-wise training modes inside llm-compressor's sequential pipeline."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.testing_utils import (
    FAST,
    make_dataset,
    make_model,
    run_oneshot,
    save_model,
    shipped_recipe,
)
from tomoe_modifier import ToMoEModifier, ToMoESparseMLP
from tomoe_modifier.convert import order_union_blocks
from tomoe_modifier.router import LayerMasks, build_routers
from tomoe_modifier.train import GatedMLPs

LAYERWISE = dict(FAST, warm_start_tokens=512)


def _masks_in_dense_order(mlp, moe):
    """A converted MLP's expert masks [E, I] in the dense MLP's channel order: the
    layer-wise modes store the channels permuted, and each stored gate row is found
    among the dense ones."""
    rows = moe.gate_up_proj.weight[0::2]  # [U, D], U <= I (unused ones dropped)
    match = (rows[:, None, :] == mlp.gate_proj.weight[None]).all(dim=-1)  # [U, I]
    assert match.sum(dim=1).eq(1).all(), "stored channels are not the dense ones"
    masks = moe.expert_blocks.new_zeros(moe.num_experts, match.shape[1])
    masks[:, match.int().argmax(dim=1)] = moe.expert_blocks
    return masks.float()


def _gated_logits(dense_dir, converted, x):
    """The dense model run through the training hooks with the converted model's
    routers and masks: what the layer-wise fits trained."""
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    moes = [layer.mlp for layer in converted.model.layers]
    _, routers = build_routers(64, 4, [128, 128], 3.0)
    for router, moe in zip(routers, moes):
        router.gate.weight.data.copy_(moe.router.weight)
    mlps = [layer.mlp for layer in dense.model.layers]
    gates = GatedMLPs(mlps, [m.down_proj for m in mlps], routers, 1, 0.4)
    gates.noise = 0.0
    gates.layer_masks = [
        LayerMasks(_masks_in_dense_order(mlp, moe)) for mlp, moe in zip(mlps, moes)
    ]
    with torch.no_grad(), gates:
        return dense(x).logits


@pytest.mark.integration
def test_layerwise_conversion_equals_its_own_gates(tmp_path, tiny_llama_dir):
    modifier = ToMoEModifier(
        train_mode="layerwise", target_active_ratio=0.6, **LAYERWISE
    )
    assert modifier.requires_calibration_data  # runs in the sequential pipeline
    model = run_oneshot(tiny_llama_dir, [modifier], tmp_path / "out")
    moes = [layer.mlp for layer in model.model.layers]
    assert all(isinstance(m, ToMoESparseMLP) for m in moes)
    assert all(not m.expert_blocks.all() for m in moes), "layers were not fitted"
    for m in moes:  # stored in the union order, as a global-mode conversion stores
        used = order_union_blocks(m.expert_blocks)
        assert used == list(range(len(used)))
        padding = m.expert_blocks.shape[1] - len(used)  # to the quantization group
        assert 0 <= padding * m.block_size < max(modifier.width_multiple, 1)
    assert model.config.moe_union_sizes == [m.union_size for m in moes]
    assert all(m.gate_up_proj.weight.shape[0] == 2 * m.union_size for m in moes)
    report = modifier.report
    assert [r["layer"] for r in report["layerwise"]] == [0, 1]
    assert abs(report["active_ratio_uniform_routing"] - 0.6) < 0.05
    x = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        converted = model(x).logits
    assert (converted - _gated_logits(tiny_llama_dir, model, x)).abs().max() < 1e-5
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, converted)


@pytest.mark.integration
def test_offloaded_and_resident_layerwise_runs_give_the_same_checkpoint(tmp_path):
    from compressed_tensors.offload import get_offloaded_device, load_offloaded_model

    dense_dir = save_model(make_model("llama"), tmp_path / "dense")
    run_oneshot(
        dense_dir,
        [ToMoEModifier(train_mode="layerwise", **LAYERWISE)],
        tmp_path / "resident",
        shuffle_calibration_samples=False,  # both runs see the data in one order
    )
    with load_offloaded_model():
        offloaded = AutoModelForCausalLM.from_pretrained(
            dense_dir,
            device_map="auto_offload",
            max_memory={"cpu": 1},  # nothing fits in memory: every layer on disk
            offload_folder=str(tmp_path / "offload"),
        )
    assert any(tmp_path.joinpath("offload").iterdir()), "nothing was offloaded"
    converted = run_oneshot(
        offloaded,
        [ToMoEModifier(train_mode="layerwise", **LAYERWISE)],
        tmp_path / "disk",
        shuffle_calibration_samples=False,
    )
    # the converted experts stay on disk like the rest, not in host memory
    for layer in converted.model.layers:
        for proj in (layer.mlp.gate_up_proj, layer.mlp.down_proj, layer.mlp.router):
            assert get_offloaded_device(proj) == "disk"
    resident = load_file(tmp_path / "resident" / "model.safetensors")
    disk = load_file(tmp_path / "disk" / "model.safetensors")
    assert resident.keys() == disk.keys()
    for name in resident:
        assert torch.equal(resident[name], disk[name]), name


@pytest.mark.integration
def test_layerwise_runs_repeat_whatever_the_global_rng(tmp_path, tiny_llama_dir):
    # llm-compressor shuffles with torch's global RNG; a dataset larger than
    # num_calibration_samples makes each run's layer fits see other rows
    dataset = make_dataset(num_samples=64)
    routers = []
    for run, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)  # a fresh process starts anywhere
        model = run_oneshot(
            tiny_llama_dir,
            [ToMoEModifier(train_mode="layerwise", **LAYERWISE)],
            tmp_path / f"run{run}",
            dataset=dataset,
        )
        routers.append(
            [layer.mlp.router.weight.clone() for layer in model.model.layers]
        )
    for first, second in zip(*routers):
        assert torch.equal(first, second)


@pytest.mark.integration
def test_layerwise_then_global_improves_on_its_layer_fits(
    tmp_path, tiny_llama_dir, monkeypatch
):
    phase_start = {}
    end_to_end = ToMoEModifier._global_phase

    def timed_phase(self, model, run, loader):
        phase_start["s"] = time.perf_counter() - run.start
        time.sleep(0.5)  # the end-to-end phase must not count as layer-wise time
        return end_to_end(self, model, run, loader)

    monkeypatch.setattr(ToMoEModifier, "_global_phase", timed_phase)
    modifier = ToMoEModifier(
        train_mode="layerwise_then_global",
        report_path=str(tmp_path / "report.json"),
        **LAYERWISE,
    )
    run_oneshot(tiny_llama_dir, [modifier], tmp_path / "out")
    report = json.loads((tmp_path / "report.json").read_text())
    history = report["history"]
    assert report["train_mode"] == "layerwise_then_global" and history
    assert history[-1]["distill_kl"] < history[0]["distill_kl"] * 1.5
    # the noise anneals from the first step after the layer fits (the default)
    assert history[0]["noise"] < 1.0 and history[-1]["noise"] == 0.0
    # the layer-wise phase is timed up to the start of the end-to-end one
    assert report["layerwise_seconds"] <= round(phase_start["s"], 1) + 0.1


@pytest.mark.integration
def test_layerwise_with_gptq_w4a16_quantizes_the_fitted_experts(tmp_path):
    dense_dir = save_model(
        make_model("llama", hidden=128, intermediate=512), tmp_path / "dense"
    )
    recipe = shipped_recipe(
        tmp_path,
        "tomoe_50_w4a16.yaml",
        iters=4,
        train_mode="layerwise",
        warm_start_tokens=512,
    )
    model = run_oneshot(dense_dir, recipe, tmp_path / "out")
    moes = [layer.mlp for layer in model.model.layers]
    assert all(hasattr(m.gate_up_proj, "quantization_scheme") for m in moes)
    assert all(not m.expert_blocks.all() for m in moes)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    x = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        expected = model(x).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        torch.testing.assert_close(reloaded(x).logits, expected)
