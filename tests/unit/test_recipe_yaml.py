"""Saved recipes with enum-valued fields load back with yaml.safe_load."""

import pytest
import yaml
from compressed_tensors.quantization import ActivationOrdering

import tomoe_modifier  # noqa: F401  (registers the representer)


@pytest.mark.unit
def test_enum_members_dump_as_their_values():
    text = yaml.dump({"actorder": ActivationOrdering.STATIC})
    assert "python/object" not in text
    assert yaml.safe_load(text) == {"actorder": "static"}


@pytest.mark.unit
def test_gptq_modifier_round_trips_through_the_saved_recipe_format():
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.recipe import Recipe

    original = GPTQModifier(
        scheme="W4A16", targets="Linear", actorder=ActivationOrdering.GROUP
    )
    text = Recipe.from_modifiers([original]).yaml()
    assert "python/object" not in text
    rebuilt = Recipe.create_instance(text).modifiers[0]
    assert type(rebuilt).__name__ == "GPTQModifier"

    def actorder(modifier):
        groups = modifier.resolve_quantization_config().config_groups
        return groups["group_0"].weights.actorder

    assert actorder(rebuilt) == actorder(original) == ActivationOrdering.GROUP
