"""The converted MoE MLP: fast sliced path == masked reference, save/load, decode."""

import pytest
import torch
from llmcompressor.modeling.moe.context import moe_calibration_context

import tomoe_modifier.modeling_tomoe as modeling
from tests.testing_utils import make_model
from tomoe_modifier.convert import build_sparse_mlp
from tomoe_modifier.mappings import MLPLayout
from tomoe_modifier.modeling_tomoe import (
    ToMoESparseMLP,
    blocks_to_ranges,
    can_slice_weights,
    merge_ranges,
    sliced_forward,
)


def masked_reference(moe, x):
    """ToMoESparseMLP.forward with the CPU fast path switched off."""
    original = modeling.can_slice_weights
    modeling.can_slice_weights = lambda *_: False
    try:
        return moe(x)
    finally:
        modeling.can_slice_weights = original


def _random_moe(bias=False, seed=0, experts=4, union=96, block=16, hidden=64):
    torch.manual_seed(seed)
    moe = ToMoESparseMLP(hidden, union, experts, block, "silu", bias=bias)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    moe.expert_blocks.copy_(torch.rand(experts, union // block) > 0.4)
    moe.expert_blocks[:, 0] = True
    return moe.eval()


@pytest.mark.unit
def test_blocks_to_ranges_merges_adjacent_blocks():
    assert blocks_to_ranges([True, True, False, True], 16) == [(0, 32), (48, 64)]
    assert blocks_to_ranges([False, False], 8) == []


@pytest.mark.unit
def test_merge_ranges_joins_only_small_gaps():
    ranges = [(0, 4), (6, 10), (30, 32)]
    assert merge_ranges(ranges, 3) == [(0, 10), (30, 32)]
    assert merge_ranges(ranges, 0) == ranges
    assert merge_ranges(ranges, 100) == [(0, 32)]


@pytest.mark.unit
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 2, 37])
@pytest.mark.parametrize("block", [1, 16])
def test_sliced_path_equals_masked_reference(bias, tokens, block):
    moe = _random_moe(bias=bias, block=block)
    x = torch.randn(tokens, 64)
    ids = moe.router(x).argmax(-1)
    assert can_slice_weights(moe, x)
    torch.testing.assert_close(
        sliced_forward(moe, x, ids), masked_reference(moe, x), atol=1e-5, rtol=1e-5
    )


@pytest.mark.unit
def test_gap_merging_and_union_fallback_stay_exact(monkeypatch):
    moe = _random_moe(block=1)  # per-channel experts: many short ranges
    x = torch.randn(9, 64)
    ids = moe.router(x).argmax(-1)
    reference = masked_reference(moe, x)
    for overhead in (0, 8, 10_000):  # no merging, some gaps, whole spans
        monkeypatch.setattr(modeling, "SLICE_OVERHEAD_CHANNELS", {x.dtype: overhead})
        moe.plan_cache().clear()
        for t in (1, 3, 9):
            torch.testing.assert_close(
                sliced_forward(moe, x[:t], ids[:t]), reference[:t]
            )
    cache = moe.plan_cache()
    plans = [v for k, v in cache.items() if k[0] != "mask"]
    assert any(keep is not None for plan in plans for _, _, keep in plan)
    assert ("mask", x.dtype) in cache, "the union fallback never ran"


@pytest.mark.unit
def test_batch_with_mixed_experts_matches_token_by_token():
    moe = _random_moe()
    x = torch.randn(3, 11, 64)
    ids = moe.router(x.reshape(-1, 64)).argmax(-1)
    assert ids.unique().numel() > 1, "test needs tokens routed to several experts"
    batched = moe(x)
    single = torch.stack([moe(x[b, t : t + 1]) for b in range(3) for t in range(11)])
    torch.testing.assert_close(batched.reshape(-1, 64), single.reshape(-1, 64))


@pytest.mark.unit
def test_union_is_padded_to_the_width_multiple_with_unused_channels():
    dense = make_model("llama").model.layers[0].mlp  # 128 channels
    router = torch.nn.Linear(64, 2, bias=False)
    masks = torch.zeros(2, 128, dtype=torch.bool)
    masks[0, :10] = True
    masks[1, 5:40] = True  # union of 40 channels, padded to 64
    moe = build_sparse_mlp(dense, MLPLayout(), router, masks, 1, "silu", 32)
    assert moe.union_size == 64
    assert moe.expert_widths().tolist() == [10, 35]
    assert not moe.expert_blocks[:, 40:].any()
    x = torch.randn(5, 64)
    expected = dense.down_proj(
        dense.act_fn(dense.gate_proj(x)) * dense.up_proj(x) * masks[0].float()
    )
    torch.nn.init.zeros_(moe.router.weight)  # every token to expert 0
    torch.testing.assert_close(moe(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.unit
def test_full_masks_reproduce_dense_mlp():
    dense = make_model("llama").model.layers[0].mlp
    router = torch.nn.Linear(64, 4, bias=False)
    masks = torch.ones(4, 8, dtype=torch.bool)
    moe = build_sparse_mlp(dense, MLPLayout(), router, masks, 16, "silu")
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=1e-5)


@pytest.mark.unit
def test_expert_ranges_follow_buffer_updates():
    moe = _random_moe()
    before = moe.expert_ranges()
    moe.expert_blocks.zero_()
    moe.expert_blocks[:, 1] = True
    assert moe.expert_ranges() != before
    assert moe.expert_ranges()[0] == [(16, 32)]


@pytest.mark.unit
def test_calibration_flag_shows_down_proj_every_channel():
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


@pytest.mark.unit
def test_config_names_one_expert_per_token_and_no_dense_mlp_in_tp_plan():
    from tomoe_modifier.modeling_tomoe import TOMOE_ARCHITECTURES

    for config_cls, _ in TOMOE_ARCHITECTURES.values():
        config = config_cls()
        assert config.num_experts_per_tok == 1
        plan = config.base_model_tp_plan or {}
        assert plan and not any(".mlp." in key for key in plan)
