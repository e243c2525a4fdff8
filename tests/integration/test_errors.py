"""Bad models and data get a clear error before any training, and nothing is
written (the construction-time field checks are in tests/unit/test_base.py)."""

import pytest
import torch
from datasets import Dataset
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import GPT2Config, GPT2LMHeadModel

from tests.testing_utils import (
    make_dataset,
    make_model,
    make_tokenizer,
    run_oneshot,
    save_model,
)
from tomoe_modifier import ToMoEModifier

TINY = dict(num_experts=4, width_multiple=16, iters=2)


def _nothing_saved(out) -> bool:
    return not (out / "model.safetensors").exists()


@pytest.mark.integration
def test_unsupported_architecture_names_supported_ones(tmp_path):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4))
    gpt2.save_pretrained(tmp_path / "gpt2")
    make_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="No ToMoE MLP layout for GPT2LMHeadModel"):
        run_oneshot(str(tmp_path / "gpt2"), [ToMoEModifier(**TINY)], tmp_path / "out")
    assert _nothing_saved(tmp_path / "out")


@pytest.mark.integration
def test_missing_calibration_data(tmp_path, tiny_llama_dir):
    from llmcompressor import oneshot

    with pytest.raises(ValueError, match="none was given"):
        oneshot(
            model=tiny_llama_dir,
            recipe=[ToMoEModifier(**TINY)],
            output_dir=str(tmp_path / "out"),
        )
    assert _nothing_saved(tmp_path / "out")


@pytest.mark.integration
def test_empty_calibration_dataset(tmp_path, tiny_llama_dir):
    empty = Dataset.from_dict({"input_ids": [], "attention_mask": []})
    # llm-compressor's sampler rejects an empty dataset before ToMoE runs
    with pytest.raises(ValueError, match="num_samples=0"):
        run_oneshot(
            tiny_llama_dir, [ToMoEModifier(**TINY)], tmp_path / "out", dataset=empty
        )
    assert _nothing_saved(tmp_path / "out")


@pytest.mark.integration
def test_single_token_sequences(tmp_path, tiny_llama_dir):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        run_oneshot(
            tiny_llama_dir,
            [ToMoEModifier(**TINY)],
            tmp_path / "out",
            dataset=make_dataset(seq_len=1),
            seq_len=1,
        )
    assert _nothing_saved(tmp_path / "out")


@pytest.mark.integration
def test_already_converted_model(tmp_path, tiny_llama_dir):
    run_oneshot(tiny_llama_dir, [ToMoEModifier(**TINY)], tmp_path / "moe")
    with pytest.raises(ValueError, match="already a ToMoE mixture of experts"):
        run_oneshot(str(tmp_path / "moe"), [ToMoEModifier(**TINY)], tmp_path / "out")


@pytest.mark.integration
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width_multiple": 48}, "width_multiple must divide"),
        ({"width_multiple": 128}, "fewer than 2 multiples"),
        ({"mask_block_size": 128}, "fewer than 2 blocks"),
        ({"mask_block_size": 48}, "mask_block_size must divide"),
        ({"target_active_ratio": 0.2}, "not reachable"),
    ],
)
def test_widths_that_cannot_work(tmp_path, tiny_llama_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        modifier = ToMoEModifier(**{**TINY, **kwargs})
        run_oneshot(tiny_llama_dir, [modifier], tmp_path / "out")
    assert _nothing_saved(tmp_path / "out")


@pytest.mark.integration
def test_quantizer_before_tomoe_is_an_error(tmp_path):
    d = save_model(make_model(), tmp_path / "dense")
    recipe = [
        QuantizationModifier(targets="Linear", scheme="W8A16", ignore=["lm_head"]),
        ToMoEModifier(**TINY),
    ]
    with pytest.raises(ValueError, match="must come before quantization modifiers"):
        run_oneshot(d, recipe, tmp_path / "out")
    assert _nothing_saved(tmp_path / "out")


@pytest.mark.integration
@pytest.mark.parametrize(
    "family, kwargs, message",
    [
        ("qwen3", {"attention_pruning": True}, "does not support Qwen3Attention"),
        ("llama", {"attention_pruning": True, "expert_layout": "shared"}, "Qwen2-MoE"),
        ("llama", {"expert_bias": True, "expert_layout": "shared"}, "no output bias"),
        ("qwen3", {"expert_layout": "shared"}, "q/k norms"),
    ],
)
def test_options_a_model_cannot_take_fail_before_training(
    tmp_path, family, kwargs, message
):
    d = save_model(make_model(family), tmp_path / "dense")
    with pytest.raises(ValueError, match=message):
        run_oneshot(d, [ToMoEModifier(**{**TINY, **kwargs})], tmp_path / "out")
    assert _nothing_saved(tmp_path / "out")
