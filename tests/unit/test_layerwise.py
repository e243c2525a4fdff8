"""Layer-local fitting and the global width allocation."""

import pytest
import torch

from tests.testing_utils import FAST, make_model, run_oneshot, save_model
from tomoe_modifier import ToMoEModifier, ToMoESparseMLP
from tomoe_modifier.layerwise import (
    allocate_widths,
    block_energy,
    masked_output_error,
    normalised_error,
)
from tomoe_modifier.sequential import _channel_activations


@pytest.mark.unit
def test_allocation_spends_the_budget_on_the_layer_that_needs_it():
    torch.manual_seed(0)
    tokens, blocks = 64, 10
    spread = torch.rand(tokens, blocks) + 0.5  # energy spread over every block
    peaked = torch.zeros(tokens, blocks)
    peaked[:, 0] = 1.0  # all energy in one block
    assignment = [torch.zeros(tokens, dtype=torch.long)] * 2  # one expert used
    widths = allocate_widths([spread, peaked], assignment, 2, [1, 1], budget=8.0)
    assert int(widths[1][0]) == 1, "the peaked layer needs only its one block"
    assert int(widths[0][0]) == 7, "the rest of the budget goes to the spread layer"
    assert (torch.stack(widths) >= 1).all()


@pytest.mark.integration
def test_oneshot_with_the_layerwise_start(tmp_path):
    dense = save_model(make_model("llama"), tmp_path / "dense")
    modifier = ToMoEModifier(
        warm_start="layerwise",
        warm_start_tokens=256,
        target_active_ratio=0.6,
        report_path=str(tmp_path / "report.json"),
        **FAST,
    )
    model = run_oneshot(dense, [modifier], tmp_path / "out")
    assert all(isinstance(layer.mlp, ToMoESparseMLP) for layer in model.model.layers)
    report = modifier.report
    assert len(report["warm_start"]["layers"]) == 2
    assert all(0 <= layer["error"] < 1 for layer in report["warm_start"]["layers"])


@pytest.mark.integration
def test_per_layer_widths_give_every_layer_the_same_mean_width(tmp_path):
    torch.manual_seed(0)
    dense = save_model(make_model("llama"), tmp_path / "dense")
    widths = {}
    for over in ("global", "per_layer"):
        modifier = ToMoEModifier(
            warm_start="layerwise",
            warm_start_widths=over,
            warm_start_tokens=256,
            target_active_ratio=0.6,
            report_path=str(tmp_path / f"{over}.json"),
            **dict(FAST, iters=1, noise_anneal=1.0),
        )
        run_oneshot(dense, [modifier], tmp_path / over)
        widths[over] = [
            layer["target_width"] for layer in modifier.report["warm_start"]["layers"]
        ]
    per_layer = widths["per_layer"]
    assert max(per_layer) - min(per_layer) <= 1.0, per_layer
    assert widths["global"] != per_layer


@pytest.mark.unit
def test_clustering_groups_tokens_by_the_channels_they_need():
    from tomoe_modifier.layerwise import cluster_tokens, fit_router

    torch.manual_seed(0)
    energy = torch.rand(40, 8) * 0.01
    energy[:20, :2] = 1.0  # half of the tokens need blocks 0-1, half blocks 6-7
    energy[20:, 6:] = 1.0
    labels = cluster_tokens(energy, torch.randint(2, (40,)), [2, 2])
    assert labels[:20].unique().numel() == 1 and labels[20:].unique().numel() == 1
    assert labels[0] != labels[-1]
    x = torch.randn(40, 16)
    x[:20, 0] += 4.0  # the groups are separable from the input
    weight = fit_router(x, labels, torch.zeros(2, 16))
    assert torch.equal((x @ weight.t()).argmax(-1), labels)


@pytest.mark.unit
def test_renamed_fields_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="warm_start"):
        modifier = ToMoEModifier(init_strategy="dense", init_tokens=128)
    assert modifier.warm_start == "dense" and modifier.warm_start_tokens == 128


@pytest.mark.unit
@pytest.mark.parametrize("block_size", [1, 4])
def test_chunked_fit_arrays_equal_the_whole_ones(block_size):
    # the fit slices [T, I] work to bound its memory; the numbers must not change
    g = torch.Generator().manual_seed(0)
    x, gate, up = (torch.randn(s, generator=g) for s in [(50, 8), (16, 8), (16, 8)])
    down = torch.randn(8, 16, generator=g)
    act = torch.nn.functional.silu
    h = _channel_activations(act, x, gate, up, chunk=7)
    torch.testing.assert_close(h, act(x @ gate.t()) * (x @ up.t()))
    norms = down.square().sum(0)
    whole = (h.square() * norms).view(50, -1, block_size).sum(-1)
    torch.testing.assert_close(block_energy(h, down, block_size), whole)
    blocks = torch.rand(3, 16 // block_size, generator=g) > 0.5
    routed = torch.randint(3, (50,), generator=g)
    keep = blocks[routed].float().repeat_interleave(block_size, -1)
    expected = normalised_error((h * keep) @ down.t(), h @ down.t())
    error = masked_output_error(h, down, blocks, routed, block_size, chunk=7)
    torch.testing.assert_close(error.float(), expected)
