"""Conversion exactness: the MoE computes what the trained gates computed, noise off."""

import pytest
import torch
from conftest import make_model

from tomoe_modifier.convert import convert_model, final_block_masks, order_union_blocks
from tomoe_modifier.mappings import get_layout
from tomoe_modifier.router import ExpertHypernetwork, LayerRouter
from tomoe_modifier.train import GatedMLPs

BLOCK = 16


def _trained_like_gates(model, experts=4, seed=0):
    """Routers/hypernetwork with random weights so experts differ and drop blocks."""
    torch.manual_seed(seed)
    layers = model.model.layers
    hn = ExpertHypernetwork(len(layers), experts)
    routers = [
        LayerRouter(model.config.hidden_size, experts, 128 // BLOCK, offset=0.0)
        for _ in layers
    ]
    for r in routers:
        torch.nn.init.normal_(r.router.weight, 0, 1.0)
        torch.nn.init.normal_(r.decoder[-1].weight, 0, 0.5)
    return hn.eval(), [r.eval() for r in routers]


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_converted_logits_equal_gated_logits(family):
    model = make_model(family)
    hn, routers = _trained_like_gates(model)
    mlps = [layer.mlp for layer in model.model.layers]
    gates = GatedMLPs(mlps, [m.down_proj for m in mlps], routers, BLOCK, 0.4)
    gates.noise = False
    masks = final_block_masks(hn, routers, 0.4)
    assert any(not m.all() for m in masks), "test needs experts that drop blocks"
    gates.block_masks = [m.float() for m in masks]
    x = torch.randint(4, 256, (3, 19))
    with torch.no_grad(), gates:
        gated = model(x).logits
    arch, layout = get_layout(model)
    convert_model(model, arch, layout, [0, 1], routers, masks, BLOCK, 4)
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
    assert order[0] == 4  # the block every expert uses goes first
