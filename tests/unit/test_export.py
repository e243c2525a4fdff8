"""The "shared" layout: capacitated assignment, training-time masks, and the stock
Qwen2-MoE export that computes exactly what the trained gates compute."""

import json

import pytest
import torch

from tests.testing_utils import fresh_process_logits, make_model, make_tokenizer
from tomoe_modifier.budget import count_budget
from tomoe_modifier.convert import final_layer_masks
from tomoe_modifier.export import check_stock_export, export_qwen2_moe
from tomoe_modifier.mappings import get_layout
from tomoe_modifier.router import assign_blocks, build_routers
from tomoe_modifier.train import GatedMLPs

EXPERTS, SHARED, ROUTED = 4, 32, 16  # channels of the tiny model's 128-wide MLPs


@pytest.mark.unit
def test_assign_blocks_fills_capacities_disjointly_by_score():
    torch.manual_seed(0)
    scores = torch.randn(3, 20)
    hard = assign_blocks(scores, [4, 4, 6])
    assert hard.sum(dim=1).tolist() == [4, 4, 6]
    assert (hard.sum(dim=0) <= 1).all(), "a block went to two categories"
    # stable: block 2 loses category 1 to block 1, then displaces block 3 from
    # category 0, which prefers it
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 9.0, 8.0, 0.0]])
    hard = assign_blocks(scores, [2, 1])
    assert hard[1].nonzero().flatten().tolist() == [1]
    assert hard[0].nonzero().flatten().tolist() == [0, 2]


@pytest.mark.unit
def test_shared_router_masks_are_shared_plus_one_disjoint_group():
    torch.manual_seed(0)
    hypernet, routers = build_routers(64, EXPERTS, [128], 3.0, shared=(SHARED, ROUTED))
    embeddings = hypernet()
    assert embeddings.shape[1] == EXPERTS + 1
    masks = routers[0].layer_masks(embeddings[0], 0.4, noise=1.0)
    experts = masks.experts.detach()
    shared = masks.shared.detach()
    assert shared.sum() == SHARED
    assert (experts.sum(dim=1) == SHARED + ROUTED).all()
    routed = masks.routed.detach()
    assert (routed.sum(dim=0) <= 1).all() and (routed * shared).sum() == 0
    (masks.experts.sum() + masks.shared.sum()).backward()
    assert routers[0].block_bias.grad.abs().sum() > 0, "no straight-through gradient"


def _trained_like(model, seed=0):
    torch.manual_seed(seed)
    hypernet, routers = build_routers(
        model.config.hidden_size, EXPERTS, [128, 128], 0.0, shared=(SHARED, ROUTED)
    )
    for router in routers:
        torch.nn.init.normal_(router.gate.weight, 0, 1.0)
        torch.nn.init.normal_(router.decoder[-1].weight, 0, 0.5)
        torch.nn.init.normal_(router.shared_gate.weight, 0, 0.3)
    return hypernet.eval(), [r.eval() for r in routers]


def _gated_and_exported(family):
    model = make_model(family)
    hypernet, routers = _trained_like(model)
    mlps = [layer.mlp for layer in model.model.layers]
    gates = GatedMLPs(mlps, [m.down_proj for m in mlps], routers, 1, 0.4)
    gates.noise = 0.0
    masks = final_layer_masks(hypernet, routers, 0.4)
    gates.layer_masks = [
        m._replace(experts=m.experts.float(), shared=m.shared.float()) for m in masks
    ]
    x = torch.randint(4, 256, (3, 19))
    with torch.no_grad(), gates:
        gated = model(x).logits
    _, layout = get_layout(model)
    info = export_qwen2_moe(model, layout, [0, 1], routers, masks, 1)
    return model, x, gated, info


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_exported_qwen2_moe_equals_the_trained_gates(family):
    model, x, gated, info = _gated_and_exported(family)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert info == {"shared_size": SHARED, "routed_size": ROUTED}
    assert model.config.qkv_bias  # zero biases where the source has none (vLLM)
    q_bias = model.model.layers[0].self_attn.q_proj.bias
    assert (q_bias == 0).all() == (family != "qwen2")
    with torch.no_grad():
        exported = model(x).logits
    assert (gated - exported).abs().max() < 1e-5


@pytest.mark.unit
def test_exported_checkpoint_loads_with_stock_transformers(tmp_path):
    model, x, gated, _ = _gated_and_exported("llama")
    model.save_pretrained(tmp_path / "out")
    make_tokenizer().save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["model_type"] == "qwen2_moe" and "auto_map" not in config
    assert config["num_experts_per_tok"] == 1 and config["norm_topk_prob"] is True
    assert not list((tmp_path / "out").glob("*.py")), "no remote code"
    logits, loaded = fresh_process_logits(tmp_path / "out", x, tmp_path)
    assert loaded.endswith(".Qwen2MoeForCausalLM"), loaded
    assert (logits - gated).abs().max() < 1e-5


@pytest.mark.unit
def test_models_qwen2_moe_cannot_hold_are_refused_before_training():
    for model, message in (
        (make_model("qwen3"), "q/k norms"),
        (make_model("llama", attention_bias=True), "o_proj has a bias"),
        (make_model("llama", mlp_bias=True), "MLP has biases"),
        (make_model("mistral", sliding_window=16), "sliding window"),
    ):
        _, layout = get_layout(model)
        with pytest.raises(ValueError, match=message):
            check_stock_export(model, layout)


@pytest.mark.unit
def test_shared_widths_fit_the_budget_and_the_dense_storage():
    model = make_model("llama", intermediate=1024)
    _, layout = get_layout(model)
    budget = count_budget(model, layout, [0, 1], router_params=64 * (8 + 1))
    shared, routed = budget.shared_widths(0.5, 8, 16)
    assert shared % 16 == 0 and routed % 16 == 0 and routed >= 16
    assert shared + 8 * routed <= 1024
    exact = budget.channel_fraction(0.5) * 1024
    assert abs(shared + routed - exact) <= 8
    with pytest.raises(ValueError, match="no routed group"):
        budget.shared_widths(0.99, 8, 16)


@pytest.mark.unit
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 19)])
def test_cpu_kernels_compute_what_stock_qwen2_moe_computes(shape):
    import copy

    from tomoe_modifier import use_cpu_kernels
    from tomoe_modifier.modeling_tomoe import ToMoESparseMLP

    model, _, _, _ = _gated_and_exported("llama")
    fast = use_cpu_kernels(copy.deepcopy(model))
    assert all(isinstance(layer.mlp, ToMoESparseMLP) for layer in fast.model.layers)
    x = torch.randint(4, 256, shape)
    with torch.no_grad():
        torch.testing.assert_close(
            fast(x).logits, model(x).logits, atol=1e-5, rtol=1e-5
        )
