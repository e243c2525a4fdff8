"""The shipped recipes: one ToMoE stage, valid fields, quantizers after ToMoE."""

import pytest
import yaml

from tests.testing_utils import RECIPES
from tomoe_modifier import ToMoEModifier

SHIPPED = sorted(RECIPES.glob("*.yaml"))


def _tomoe_fields(path) -> dict:
    return yaml.safe_load(path.read_text())["tomoe_stage"]["tomoe_modifiers"][
        "ToMoEModifier"
    ]


@pytest.mark.unit
def test_every_recipe_has_the_same_tomoe_stage():
    """One set of ToMoE settings; the shared recipes differ only in the layout."""
    assert len(SHIPPED) >= 5
    reference = _tomoe_fields(RECIPES / "tomoe_50.yaml")
    for path in SHIPPED:
        fields = _tomoe_fields(path)
        layout = fields.pop("expert_layout", "paper")
        assert layout == ("shared" if "shared" in path.name else "paper"), path.name
        assert fields == reference, f"{path.name} drifted"


@pytest.mark.unit
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_recipe_fields_build_a_modifier_and_tomoe_comes_first(path):
    recipe = yaml.safe_load(path.read_text())
    assert next(iter(recipe)) == "tomoe_stage"
    ToMoEModifier(**_tomoe_fields(path))
