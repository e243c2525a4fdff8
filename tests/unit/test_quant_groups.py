"""width_multiple unset follows the group size of the quantization after ToMoE."""

import pytest
from llmcompressor.core import create_session
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.recipe import Recipe

from tomoe_modifier import ToMoEModifier
from tomoe_modifier.quant_groups import following_group_size


def _group_size_in(modifiers, tomoe) -> int | None:
    with create_session() as session:
        session.lifecycle.recipe = Recipe.create_instance(path_or_modifiers=modifiers)
        return following_group_size(tomoe)


@pytest.mark.unit
def test_group_size_of_every_later_grouped_quantizer():
    tomoe = ToMoEModifier()
    w4a16 = GPTQModifier(targets="Linear", scheme="W4A16")  # group 128
    groups = {
        "g48": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "strategy": "group", "group_size": 48},
        }
    }
    grouped = GPTQModifier(config_groups=groups)
    w8a8 = QuantizationModifier(targets="Linear", scheme="W8A8")  # per channel
    assert _group_size_in([tomoe, w4a16], tomoe) == 128
    assert _group_size_in([tomoe, w8a8, w4a16, grouped], tomoe) == 384  # lcm
    assert _group_size_in([tomoe, w8a8], tomoe) is None
    assert _group_size_in([w4a16, tomoe], tomoe) is None  # before ToMoE: not ours
    assert _group_size_in([w4a16], tomoe) is None  # ToMoE outside the recipe


@pytest.mark.unit
@pytest.mark.parametrize(("layout", "expected"), [("paper", 1), ("shared", 64)])
def test_unset_width_multiple_without_quantization(layout, expected):
    tomoe = ToMoEModifier(expert_layout=layout)
    assert tomoe.width_multiple is None
    with create_session() as session:
        session.lifecycle.recipe = Recipe.create_instance(path_or_modifiers=[tomoe])
        tomoe._resolve_width_multiple()
    assert tomoe.width_multiple == expected
