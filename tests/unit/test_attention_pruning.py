"""Static q/k head-dim pruning: exact after conversion, counted by the budget."""

import pytest
import torch

from tests.testing_utils import assert_cached_decoding_matches, make_model
from tomoe_modifier.budget import count_budget
from tomoe_modifier.convert import (
    convert_model,
    final_layer_masks,
    final_qk_dims,
    prune_attention,
)
from tomoe_modifier.mappings import get_layout
from tomoe_modifier.router import LayerMasks, QKPruner, build_routers
from tomoe_modifier.train import GatedMLPs


def _pruned(family, seed=0):
    """A model, its training-time gated logits with pruned q/k, and its converted
    form. Heads of 16 dims: 8 RoPE pairs, random logits keep about half."""
    model = make_model(family, head_dim=16)
    torch.manual_seed(seed)
    hypernet, routers = build_routers(64, 4, [128, 128], 3.0)
    for router in routers:
        torch.nn.init.normal_(router.gate.weight, 0, 1.0)
    pruners = [QKPruner(16) for _ in range(2)]
    for pruner in pruners:
        torch.nn.init.normal_(pruner.logits, 0, 1.0)
    layers = model.model.layers
    mlps = [layer.mlp for layer in layers]
    gates = GatedMLPs(
        mlps,
        [m.down_proj for m in mlps],
        routers,
        1,
        0.4,
        [layer.self_attn for layer in layers],
        pruners,
    )
    gates.noise = 0.0
    masks = final_layer_masks(hypernet.eval(), routers, 0.4)
    gates.layer_masks = [LayerMasks(m.experts.float()) for m in masks]
    gates.qk_masks = [QKPruner.dim_mask(p.pair_mask(0.4, 0.0)) for p in pruners]
    x = torch.randint(4, 256, (3, 17))
    with torch.no_grad(), gates:
        gated = model(x).logits
    arch, layout = get_layout(model)
    dims = final_qk_dims(pruners, 0.4)
    assert all(0 < len(d) < 16 for d in dims), "test needs partly pruned heads"
    convert_model(
        model, arch, layout, [0, 1], routers, [m.experts for m in masks], 1, 4
    )
    model.config.moe_qk_dims = prune_attention(model, layout, [0, 1], dims)
    return model, x, gated, dims


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_pruned_attention_equals_the_trained_masks(family):
    model, x, gated, dims = _pruned(family)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 4 * len(dims[0])  # 4 query heads
    assert attention.k_proj.out_features == 2 * len(dims[0])  # 2 key/value heads
    with torch.no_grad():
        converted = model(x).logits
    assert (gated - converted).abs().max() < 1e-5


@pytest.mark.unit
def test_pruned_attention_decodes_with_the_kv_cache_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model, x, _, _ = _pruned("llama")
    assert_cached_decoding_matches(model, x[:2, :7], 8)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits)


@pytest.mark.unit
def test_budget_counts_the_kept_qk_dims_like_training():
    model, _, _, dims = _pruned("qwen2")
    _, layout = get_layout(model, converted=True)
    converted = count_budget(model, layout)
    dense_model = make_model("qwen2", head_dim=16)
    dense = count_budget(dense_model, layout, [0, 1], router_params=64 * 4)
    assert converted.dense_total == dense.dense_total
    per_dim = (4 + 2) * (64 + 1)  # q and k rows of one head dim, with q/k biases
    saved = sum(per_dim * (16 - len(d)) for d in dims)
    assert converted.fixed_params() == dense.fixed_params() - saved
    # the training-time count of the same kept pairs
    trained = dense.attention_saving([len(d) / 2 for d in dims])
    assert trained == pytest.approx(saved)
