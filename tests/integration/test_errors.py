"""Bad input gets a clear error before any training, and nothing is written."""

import pytest
import torch
from conftest import make_dataset, make_model, make_tokenizer, save_model
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from pydantic import ValidationError
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from tomoe_modifier import ToMoEModifier

FAST = dict(num_experts=4, width_multiple=16, iters=2)


def _oneshot(model, out, recipe, dataset="default", seq=32):
    return oneshot(
        model=model,
        dataset=make_dataset() if dataset == "default" else dataset,
        recipe=recipe,
        max_seq_length=seq,
        num_calibration_samples=16,
        output_dir=str(out),
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_experts": 1}, "num_experts must be >= 2"),
        ({"target_active_ratio": 0.0}, r"target_active_ratio must be in \(0, 1\]"),
        ({"target_active_ratio": 1.5}, r"target_active_ratio must be in \(0, 1\]"),
        ({"width_multiple": 0}, "width_multiple must be >= 1"),
        ({"iters": 0}, "iters must be >= 1"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"num_expert": 4}, "Extra inputs are not permitted"),
    ],
)
def test_bad_fields_are_rejected_at_construction(kwargs, message):
    with pytest.raises((ValueError, ValidationError), match=message):
        ToMoEModifier(**kwargs)


@pytest.mark.integration
def test_unsupported_architecture_names_supported_ones(tmp_path):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4))
    gpt2.save_pretrained(tmp_path / "gpt2")
    make_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="No ToMoE MLP layout for GPT2LMHeadModel"):
        _oneshot(str(tmp_path / "gpt2"), tmp_path / "out", [ToMoEModifier(**FAST)])
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.integration
def test_missing_calibration_data(tmp_path):
    d = save_model(make_model(), tmp_path / "dense")
    with pytest.raises(ValueError, match="none was given"):
        _oneshot(d, tmp_path / "out", [ToMoEModifier(**FAST)], dataset=None)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.integration
def test_empty_calibration_dataset(tmp_path):
    d = save_model(make_model(), tmp_path / "dense")
    empty = Dataset.from_dict({"input_ids": [], "attention_mask": []})
    # llm-compressor's sampler rejects an empty dataset before ToMoE runs
    with pytest.raises(ValueError, match="num_samples=0"):
        _oneshot(d, tmp_path / "out", [ToMoEModifier(**FAST)], dataset=empty)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # a loader that reaches ToMoE empty gets ToMoE's own message
    with pytest.raises(ValueError, match="empty calibration dataset"):
        ToMoEModifier._check_calibration_data(DataLoader(empty))


@pytest.mark.integration
def test_single_token_sequences(tmp_path):
    d = save_model(make_model(), tmp_path / "dense")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        _oneshot(
            d,
            tmp_path / "out",
            [ToMoEModifier(**FAST)],
            dataset=make_dataset(seq_len=1),
        )


@pytest.mark.integration
def test_already_converted_model(tmp_path):
    d = save_model(make_model(), tmp_path / "dense")
    _oneshot(d, tmp_path / "moe", [ToMoEModifier(**FAST)])
    with pytest.raises(ValueError, match="already a ToMoE mixture of experts"):
        _oneshot(str(tmp_path / "moe"), tmp_path / "out", [ToMoEModifier(**FAST)])


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
def test_widths_that_cannot_work(tmp_path, kwargs, message):
    d = save_model(make_model(), tmp_path / "dense")
    args = {**FAST, **kwargs}
    with pytest.raises(ValueError, match=message):
        _oneshot(d, tmp_path / "out", [ToMoEModifier(**args)])
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.integration
def test_quantizer_before_tomoe_is_an_error(tmp_path):
    d = save_model(make_model(), tmp_path / "dense")
    recipe = [
        QuantizationModifier(targets="Linear", scheme="W8A16", ignore=["lm_head"]),
        ToMoEModifier(**FAST),
    ]
    with pytest.raises(ValueError, match="must come before quantization modifiers"):
        _oneshot(d, tmp_path / "out", recipe)
    assert not (tmp_path / "out" / "model.safetensors").exists()
