"""One budget: the modifier's count, the measured count of the converted model and
the static baseline's width agree with each other and with a count done by hand."""

import pytest
import torch

from tests.testing_utils import make_model
from tomoe_modifier.baselines import width_for_ratio
from tomoe_modifier.budget import count_budget
from tomoe_modifier.convert import convert_model
from tomoe_modifier.mappings import get_layout
from tomoe_modifier.stats import active_parameter_stats

HIDDEN, WIDTH, HEADS, KV_HEADS, LAYERS, EXPERTS, BLOCK = 64, 128, 4, 2, 2, 2, 16
HEAD_DIM = HIDDEN // HEADS


def hand_attention(family: str) -> int:
    """q, k, v, o of one layer (+ q/k/v biases for Qwen2, q/k norms for Qwen3)."""
    bias = 1 if family == "qwen2" else 0
    q = HEADS * HEAD_DIM * (HIDDEN + bias)
    kv = 2 * KV_HEADS * HEAD_DIM * (HIDDEN + bias)
    o = HIDDEN * HEADS * HEAD_DIM
    norms = 2 * HEAD_DIM if family == "qwen3" else 0
    return q + kv + o + norms


PER_CHANNEL = 3 * HIDDEN  # gate row + up row + down column, no MLP biases
ROUTER = HIDDEN * EXPERTS


def _convert_with_known_experts(model):
    """Expert 0 keeps the first 4 of 8 blocks (64 channels), expert 1 all 128;
    zero routers send every token to expert 0 (argmax of equal logits)."""
    holders = []
    for _ in range(LAYERS):
        holder = torch.nn.Module()
        holder.gate = torch.nn.Linear(HIDDEN, EXPERTS, bias=False)
        torch.nn.init.zeros_(holder.gate.weight)
        holders.append(holder)
    masks = [torch.tensor([[1] * 4 + [0] * 4, [1] * 8], dtype=torch.bool)] * LAYERS
    arch, layout = get_layout(model)
    convert_model(model, arch, layout, [0, 1], holders, masks, BLOCK, EXPERTS)
    return [[64, 128]] * LAYERS


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_modifier_stats_and_baseline_agree_with_a_hand_count(family):
    model = make_model(family, head_dim=HEAD_DIM)  # Qwen3 defaults to head_dim 128
    _, layout = get_layout(model)
    attention = LAYERS * hand_attention(family)
    dense = attention + LAYERS * PER_CHANNEL * WIDTH

    # what the modifier trains against
    budget = count_budget(model, layout, [0, 1], router_params=ROUTER)
    assert budget.dense_total == dense
    assert budget.fixed_params() == attention + LAYERS * ROUTER
    assert budget.params_per_channel == [PER_CHANNEL] * LAYERS
    usage = [torch.tensor([1.0, 0.0])] * LAYERS  # every token on expert 0
    widths = [torch.tensor([64.0, 128.0])] * LAYERS
    trained = float(budget.ratio(budget.expert_params(widths, usage)))
    by_hand = (attention + LAYERS * ROUTER + LAYERS * PER_CHANNEL * 64) / dense
    assert trained == pytest.approx(by_hand)

    # the static baseline at k = 64 channels: no router
    plan = width_for_ratio(model, (attention + LAYERS * PER_CHANNEL * 64) / dense, 16)
    assert plan["intermediate_size"] == 64
    assert plan["active_ratio"] == pytest.approx(
        (attention + LAYERS * PER_CHANNEL * 64) / dense
    )
    assert plan["dense_attention_mlp_params"] == dense

    # what the converted model executes, measured on real tokens
    _convert_with_known_experts(model)
    converted = count_budget(model, layout)
    assert converted.dense_total == dense
    assert converted.fixed_params() == budget.fixed_params()
    stats = active_parameter_stats(
        model, [{"input_ids": torch.randint(4, 256, (2, 8))}]
    )
    assert stats["tokens"] == 16
    assert stats["dense_attention_mlp_params"] == dense
    assert stats["active_ratio_mean"] == pytest.approx(trained)
    assert stats["active_ratio_worst_case"] == pytest.approx(
        (attention + LAYERS * ROUTER + LAYERS * PER_CHANNEL * 128) / dense
    )
    assert stats["expert_usage"] == [[1.0, 0.0]] * LAYERS


@pytest.mark.unit
def test_layers_left_dense_count_their_whole_mlp():
    model = make_model("llama")
    _, layout = get_layout(model)
    budget = count_budget(model, layout, [1], router_params=ROUTER)
    attention = LAYERS * hand_attention("llama")
    assert budget.fixed_params() == attention + PER_CHANNEL * WIDTH + ROUTER
    assert budget.params_per_channel == [PER_CHANNEL]
    assert budget.floor(1) == pytest.approx(
        (budget.fixed_params() + PER_CHANNEL) / budget.dense_total
    )


@pytest.mark.unit
def test_mlp_biases_are_counted_once():
    model = make_model("llama", mlp_bias=True)
    _, layout = get_layout(model)
    budget = count_budget(model, layout, [0, 1], router_params=ROUTER)
    attention = LAYERS * hand_attention("llama")
    # gate/up biases are per channel; the down bias is always executed
    per_channel = PER_CHANNEL + 2
    assert budget.params_per_channel == [per_channel] * LAYERS
    assert budget.dense_total == attention + LAYERS * (per_channel * WIDTH + HIDDEN)
    assert budget.fixed_params() == attention + LAYERS * (ROUTER + HIDDEN)


@pytest.mark.unit
def test_attention_pruning_is_counted_per_kept_qk_dim():
    model = make_model("qwen2")
    _, layout = get_layout(model)
    layer = count_budget(model, layout).layers[0]
    # one q/k dim less in every head: H query + H_kv key rows of D weights + bias
    assert layer.attention_params(HEAD_DIM - 1) == hand_attention("qwen2") - (
        (HEADS + KV_HEADS) * (HIDDEN + 1)
    )
    assert layer.attention_params(None) == hand_attention("qwen2")
