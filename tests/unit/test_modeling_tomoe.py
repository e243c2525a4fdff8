"""The converted MoE MLP: fast sliced path == masked reference, save/load, decode."""

import pytest
import torch
from conftest import make_model

from tomoe_modifier.convert import build_sparse_mlp
from tomoe_modifier.mappings import MLPLayout
from tomoe_modifier.modeling_tomoe import (
    ToMoESparseMLP,
    blocks_to_ranges,
    merge_ranges,
)


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
    assert moe._can_slice_weights(x)
    torch.testing.assert_close(
        moe._forward_sliced(x, ids), moe._forward_masked(x, ids), atol=1e-5, rtol=1e-5
    )


@pytest.mark.unit
def test_gap_merging_and_union_fallback_stay_exact(monkeypatch):
    import tomoe_modifier.modeling_tomoe as modeling

    moe = _random_moe(block=1)  # per-channel experts: many short ranges
    x = torch.randn(9, 64)
    ids = moe.router(x).argmax(-1)
    reference = moe._forward_masked(x, ids)
    for overhead in (0, 8, 10_000):  # no merging, some gaps, whole spans
        monkeypatch.setattr(modeling, "SLICE_OVERHEAD_CHANNELS", {x.dtype: overhead})
        moe._plans.clear()
        for t in (1, 3, 9):
            torch.testing.assert_close(
                moe._forward_sliced(x[:t], ids[:t]), reference[:t]
            )
    plans = [v for k, v in moe._plans.items() if k[0] != "mask"]
    assert any(keep is not None for plan in plans for _, _, keep in plan)
    assert ("mask", x.dtype) in moe._plans, "the union fallback never ran"


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
def test_active_parameter_stats_counts_routed_widths():
    from tomoe_modifier.convert import convert_model
    from tomoe_modifier.mappings import get_layout
    from tomoe_modifier.stats import active_parameter_stats

    model = make_model("llama")
    routers = [torch.nn.Linear(64, 2, bias=False) for _ in range(2)]
    holders = [torch.nn.Module() for _ in range(2)]
    for h, r in zip(holders, routers):
        torch.nn.init.zeros_(r.weight)  # argmax of equal logits: expert 0
        h.router = r
    masks = [torch.tensor([[1] * 4 + [0] * 4, [1] * 8], dtype=torch.bool)] * 2
    arch, layout = get_layout(model)
    convert_model(model, arch, layout, [0, 1], holders, masks, 16, 2)
    stats = active_parameter_stats(
        model, [{"input_ids": torch.randint(4, 256, (2, 8))}]
    )
    attention = sum(
        p.numel() for layer in model.model.layers for p in layer.self_attn.parameters()
    )
    dense = attention + 2 * 3 * 64 * 128
    expected_mean = (attention + 2 * 64 * 2 + 2 * 3 * 64 * 64) / dense
    expected_worst = (attention + 2 * 64 * 2 + 2 * 3 * 64 * 128) / dense
    assert stats["tokens"] == 16
    assert stats["active_ratio_mean"] == pytest.approx(expected_mean)
    assert stats["active_ratio_worst_case"] == pytest.approx(expected_worst)
    assert stats["expert_usage"][0] == [1.0, 0.0]
