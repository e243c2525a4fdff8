"""ToMoEModifier's fields: validation at construction, registration, settings."""

import dataclasses

import pytest
import torch
from datasets import Dataset
from pydantic import ValidationError
from torch.utils.data import DataLoader

from tomoe_modifier import ToMoEModifier
from tomoe_modifier.train import TrainSettings


@pytest.mark.unit
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_experts": 1}, "num_experts must be >= 2"),
        ({"target_active_ratio": 0.0}, r"target_active_ratio must be in \(0, 1\]"),
        ({"target_active_ratio": 1.5}, r"target_active_ratio must be in \(0, 1\]"),
        ({"width_multiple": 0}, "width_multiple must be >= 1"),
        ({"iters": 0}, "iters must be >= 1 or None"),
        ({"train_window": 1}, "train_window must be >= 2 or None"),
        ({"long_window_every": -1}, "long_window_every must be >= 0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"noise_anneal": 1.5}, r"noise_anneal must be in \[0, 1\]"),
        ({"num_expert": 4}, "Extra inputs are not permitted"),
    ],
)
def test_bad_fields_are_rejected_at_construction(kwargs, message):
    with pytest.raises((ValueError, ValidationError), match=message):
        ToMoEModifier(**kwargs)


@pytest.mark.unit
def test_yaml_names_resolve_to_the_modifier():
    from llmcompressor.modifiers.factory import ModifierFactory

    modifier = ModifierFactory.create(
        "ToMoEModifier", allow_registered=True, allow_experimental=True, num_experts=3
    )
    assert isinstance(modifier, ToMoEModifier) and modifier.num_experts == 3


@pytest.mark.unit
def test_train_settings_take_every_value_from_the_modifier():
    modifier = ToMoEModifier(lr=0.02, noise_anneal=0.5, temperature=0.3, seed=7)
    settings = TrainSettings.from_fields(modifier, steps=5, compute_dtype=torch.float32)
    for field in dataclasses.fields(TrainSettings):
        if field.name not in ("steps", "compute_dtype"):
            assert getattr(settings, field.name) == getattr(modifier, field.name)
        assert field.default is dataclasses.MISSING, "defaults live on the modifier"
    assert settings.steps == 5 and settings.noise_anneal == 0.5


@pytest.mark.unit
def test_noise_anneal_default_follows_the_train_mode():
    # a layer-wise fit is noise-free: its end-to-end phase anneals over every step
    assert ToMoEModifier().noise_anneal == 0.25
    assert ToMoEModifier(train_mode="layerwise_then_global").noise_anneal == 1.0
    assert ToMoEModifier(train_mode="layerwise").noise_anneal == 0.25
    explicit = ToMoEModifier(train_mode="layerwise_then_global", noise_anneal=0.5)
    assert explicit.noise_anneal == 0.5


@pytest.mark.unit
def test_empty_calibration_loader_gets_tomoe_message():
    empty = Dataset.from_dict({"input_ids": [], "attention_mask": []})
    with pytest.raises(ValueError, match="empty calibration dataset"):
        ToMoEModifier._check_calibration_data(DataLoader(empty))
