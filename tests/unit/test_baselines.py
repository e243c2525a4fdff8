"""Static Wanda-sp baseline: right channels kept, budget counted, stock model saved."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tests.testing_utils import make_dataset, make_model, make_tokenizer
from tomoe_modifier.baselines import (
    channel_scores,
    iter_batches,
    prune_mlp_channels,
    width_for_ratio,
)

# tiny Llama: hidden 64, 4 heads of 16, 2 kv heads, MLP 128, 2 layers
ATTENTION = 64 * 64 * 2 + 64 * 32 * 2  # q, o + k, v
PER_CHANNEL = 3 * 64
DENSE = 2 * (ATTENTION + PER_CHANNEL * 128)


def _batches(num_samples=8, seq_len=16):
    return list(iter_batches(make_dataset(num_samples, seq_len), batch_size=4))


@pytest.mark.unit
def test_width_for_ratio_matches_hand_count():
    model = make_model("llama")
    plan = width_for_ratio(model, 0.5, multiple=16)
    # (0.5 * DENSE - attention) / (layers * 3 * hidden) = 32 exactly
    assert plan["intermediate_size"] == 32
    assert plan["active_ratio"] == pytest.approx(0.5)
    plan = width_for_ratio(model, 0.6, multiple=16)  # exact width 51.2 -> 48
    assert plan["intermediate_size"] == 48
    expected = 2 * (ATTENTION + PER_CHANNEL * 48) / DENSE
    assert plan["active_ratio"] == pytest.approx(expected)
    assert width_for_ratio(model, 1.0, multiple=16)["intermediate_size"] == 128


@pytest.mark.unit
def test_width_for_ratio_rejects_budget_below_attention():
    with pytest.raises(ValueError, match="attention share"):
        width_for_ratio(make_model("llama"), 0.3, multiple=16)


@pytest.mark.unit
def test_scores_follow_activation_and_weight_norms():
    model = make_model("llama")
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, 7] *= 100.0  # large output weights
        mlp.gate_proj.weight[5] = 0.0  # silu(0) * up = 0: never active
    scores = channel_scores(model, _batches())
    first = scores["scores"][0]
    assert int(first.argmax()) == 7
    assert float(first[5]) == 0.0
    assert scores["tokens"] == 8 * 16 and scores["samples"] == 8


@pytest.mark.unit
def test_padding_is_not_counted():
    model = make_model("llama")
    batch = _batches(4)[0]
    full = channel_scores(model, [batch])
    masked = dict(batch, attention_mask=batch["attention_mask"].clone())
    masked["attention_mask"][:, 12:] = 0
    half = channel_scores(model, [masked])
    assert half["tokens"] == 4 * 12
    assert (half["scores"][0] < full["scores"][0]).all()


@pytest.mark.unit
def test_pruning_keeps_the_channels_that_matter(tmp_path):
    model = make_model("llama")
    dense = make_model("llama")
    important = torch.tensor([3, 17, 40, 41, 64, 90, 100, 127])
    with torch.no_grad():
        for m in (model, dense):
            for layer in m.model.layers:
                mask = torch.zeros(128, dtype=torch.bool)
                mask[important] = True
                layer.mlp.down_proj.weight[:, ~mask] *= 1e-3
    # only the important channels matter, so pruning to them barely moves logits
    model, report = prune_mlp_channels(model, _batches(), 0.375, multiple=8)
    assert report["intermediate_size"] == 8
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (8, 64)
        assert layer.mlp.down_proj.weight.shape == (64, 8)
    ids = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        got, want = model(ids).logits, dense(ids).logits
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    # the kept rows are exactly the important dense rows
    kept = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(kept, dense.model.layers[0].mlp.up_proj.weight[important])
    assert all(m > 0.95 for m in report["score_mass_kept"])


@pytest.mark.unit
def test_pruned_model_saves_as_a_stock_smaller_model(tmp_path):
    model = make_model("llama")
    model, report = prune_mlp_channels(model, _batches(), 0.6, multiple=16)
    model.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is LlamaForCausalLM
    assert loaded.config.intermediate_size == report["intermediate_size"] == 48
    # a static model's active parameters are all of its attention+MLP parameters
    layers = loaded.model.layers
    params = sum(p.numel() for layer in layers for p in layer.self_attn.parameters())
    params += sum(p.numel() for layer in layers for p in layer.mlp.parameters())
    assert params / DENSE == pytest.approx(report["active_ratio"])
    ids = torch.randint(4, 256, (1, 10))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


@pytest.mark.unit
def test_rejects_converted_models():
    from tomoe_modifier.modeling_tomoe import ToMoELlamaConfig, ToMoELlamaForCausalLM

    config = ToMoELlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_union_sizes=[64],
        moe_block_size=16,
        num_experts=2,
    )
    with pytest.raises(ValueError, match="already a ToMoE"):
        width_for_ratio(ToMoELlamaForCausalLM(config), 0.5)


@pytest.mark.unit
def test_flap_keeps_fluctuating_channels_and_compensates_the_mean(tmp_path):
    from tomoe_modifier.baselines import flap_prune
    from tomoe_modifier.stats import active_parameter_stats

    model = make_model("llama")
    dense = make_model("llama")
    with torch.no_grad():
        for m in (model, dense):
            for layer in m.model.layers:
                layer.mlp.down_proj.weight[:, 3] *= 50.0  # one dominant channel
    batches = _batches(16, 16)
    model, report = flap_prune(model, batches, 0.6)
    assert len(report["widths"]) == 2 and all(0 < w < 128 for w in report["widths"])
    stats = active_parameter_stats(model, batches[:1])
    assert stats["active_ratio_mean"] == pytest.approx(report["active_ratio"])
    assert abs(report["active_ratio"] - 0.6) < 0.02
    ids = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        pruned = model(ids).logits
        reference = dense(ids).logits
    model.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned)
    # the bias matters: without it the error grows
    for layer in model.model.layers:
        layer.mlp.expert_bias.data.zero_()
    with torch.no_grad():
        unbiased = model(ids).logits
    assert (unbiased - reference).norm() > (pruned - reference).norm()


@pytest.mark.unit
def test_flap_uniform_gives_every_layer_one_width():
    from tomoe_modifier.baselines import flap_prune

    torch.manual_seed(0)
    model = make_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 3] *= 50.0  # one dominant channel
    model, report = flap_prune(model, _batches(16, 16), 0.6, widths="uniform")
    assert len(set(report["widths"])) == 1 and 0 < report["widths"][0] < 128
    assert abs(report["active_ratio"] - 0.6) < 0.02
    assert "uniform widths" in report["method"]
    with pytest.raises(ValueError, match="use 'global' or 'uniform'"):
        flap_prune(make_model("llama"), _batches(4, 16), 0.6, widths="per-layer")
