"""Conversion exactness: the MoE computes what the trained gates computed, noise off."""

import pytest
import torch

from tests.testing_utils import assert_cached_decoding_matches, make_model
from tomoe_modifier.convert import (
    convert_model,
    final_layer_masks,
    order_union_blocks,
    store_in_union_order,
)
from tomoe_modifier.mappings import get_layout
from tomoe_modifier.modeling_tomoe import ToMoESparseMLP
from tomoe_modifier.router import ExpertHypernetwork, LayerMasks, LayerRouter
from tomoe_modifier.train import GatedMLPs

BLOCK = 16


def _converted(family="llama", block=BLOCK, seed=0):
    model = make_model(family)
    hn, routers = _trained_like_gates(model, block=block, seed=seed)
    masks = [m.experts for m in final_layer_masks(hn, routers, 0.4)]
    arch, layout = get_layout(model)
    convert_model(model, arch, layout, [0, 1], routers, masks, block, 4)
    return model


def _trained_like_gates(model, experts=4, seed=0, block=BLOCK):
    """Routers/hypernetwork with random weights so experts differ and drop blocks."""
    torch.manual_seed(seed)
    layers = model.model.layers
    hn = ExpertHypernetwork(len(layers), experts)
    routers = [
        LayerRouter(model.config.hidden_size, experts, 128 // block, offset=0.0)
        for _ in layers
    ]
    for r in routers:
        torch.nn.init.normal_(r.gate.weight, 0, 1.0)
        torch.nn.init.normal_(r.decoder[-1].weight, 0, 0.5)
    return hn.eval(), [r.eval() for r in routers]


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("block", [1, BLOCK])
def test_converted_logits_equal_gated_logits(family, block):
    model = make_model(family)
    hn, routers = _trained_like_gates(model, block=block)
    mlps = [layer.mlp for layer in model.model.layers]
    gates = GatedMLPs(mlps, [m.down_proj for m in mlps], routers, block, 0.4)
    gates.noise = False
    layer_masks = final_layer_masks(hn, routers, 0.4)
    masks = [m.experts for m in layer_masks]
    assert any(not m.all() for m in masks), "test needs experts that drop blocks"
    gates.layer_masks = [LayerMasks(m.float()) for m in masks]
    x = torch.randint(4, 256, (3, 19))
    with torch.no_grad(), gates:
        gated = model(x).logits
    arch, layout = get_layout(model)
    convert_model(model, arch, layout, [0, 1], routers, masks, block, 4)
    assert type(model).__name__.startswith("ToMoE")
    with torch.no_grad():
        converted = model(x).logits
    assert (gated - converted).abs().max() < 1e-5


@pytest.mark.unit
def test_order_union_blocks_keeps_used_blocks_once():
    masks = torch.tensor(
        [[1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 1, 0]], dtype=torch.bool
    )
    order = order_union_blocks(masks)
    assert sorted(order) == [0, 1, 2, 4]


@pytest.mark.unit
def test_order_union_blocks_keeps_the_widest_expert_contiguous():
    torch.manual_seed(0)
    masks = torch.rand(6, 200) > 0.5
    masks[2, :150] = True  # expert 2 is the widest
    order = order_union_blocks(masks)
    ordered = masks[:, order].int()
    runs = torch.diff(ordered, dim=1, prepend=torch.zeros(6, 1, dtype=torch.int)) == 1
    assert runs[2].sum() == 1
    patterns = [tuple(masks[:, j].tolist()) for j in order]
    starts = {}
    for pos, pattern in enumerate(patterns):  # equal membership sits together
        assert pattern not in starts or patterns[pos - 1] == pattern
        starts.setdefault(pattern, pos)


@pytest.mark.unit
@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_store_in_union_order_computes_the_same_in_fewer_runs(block, bias):
    """The layer-wise modes' MLPs, converted in the dense order, are rewritten in the
    storage order of a global-mode conversion: same output, few runs per expert."""
    torch.manual_seed(0)
    moe = ToMoESparseMLP(32, 256, 4, block, bias=bias).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    moe.expert_blocks.copy_(torch.rand(4, 256 // block) > 0.5)
    moe.expert_blocks[:, 5:8] = False  # blocks no expert uses are not stored
    union = int(moe.expert_blocks.any(dim=0).sum()) * block
    x = torch.randn(64, 32)
    with torch.no_grad():
        before = moe(x)
    store_in_union_order(moe)
    with torch.no_grad():
        after = moe(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    blocks = moe.expert_blocks.int()
    runs = torch.diff(blocks, dim=1, prepend=torch.zeros(4, 1, dtype=torch.int)) == 1
    assert runs.sum(dim=1).max() <= 8  # Gray code: at most 2^(E-1) runs, not ~N/4
    assert blocks.any(dim=0).all()
    assert moe.union_size == union and moe.down_proj.weight.shape == (32, union)
    assert moe.gate_up_proj.weight.shape == (2 * union, 32)
    assert moe.down_proj.in_features == union
    weight = moe.gate_up_proj.weight.clone()
    store_in_union_order(moe)  # already in order: unchanged
    assert torch.equal(moe.gate_up_proj.weight, weight)


@pytest.mark.unit
def test_store_in_union_order_keeps_the_padding_to_whole_quantization_groups():
    """Dropped blocks leave the union a multiple of ``width_multiple`` channels, as
    a global-mode conversion stores it (GPTQ's groups must split it)."""
    torch.manual_seed(0)
    moe = ToMoESparseMLP(32, 256, 4, 4).eval()
    moe.expert_blocks.copy_(torch.rand(4, 64) > 0.5)
    moe.expert_blocks[:, :10] = False  # 54 used blocks: 216 channels
    store_in_union_order(moe, width_multiple=64)
    assert moe.union_size == 256 and moe.expert_blocks.shape == (4, 64)
    moe.expert_blocks[:, 48:] = False  # now under 192 channels are used
    store_in_union_order(moe, width_multiple=64)
    assert moe.union_size == 192 and moe.expert_blocks.any(dim=0).sum() <= 48


@pytest.mark.unit
@pytest.mark.parametrize("block", [1, 16])
def test_kv_cache_decoding_equals_full_forward(block):
    model = _converted(block=block)
    assert_cached_decoding_matches(model, torch.randint(4, 256, (2, 7)), 12)
