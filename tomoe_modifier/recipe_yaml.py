"""Make the ``recipe.yaml`` that oneshot saves loadable again.

llm-compressor writes the recipe with ``yaml.dump`` of each modifier's
``model_dump()``, which keeps enum members (e.g. GPTQ's ``actorder``) as
``!!python/object/apply:...ActivationOrdering`` tags; the recipe loader uses
``yaml.safe_load`` and rejects them, so a ToMoE + GPTQ checkpoint's own recipe
could not be re-run. Representing enum members by their plain value fixes that,
and the modifiers' pydantic fields accept the value back.
"""

from __future__ import annotations

import enum

import yaml

__all__ = ["register_enum_representer"]


def _represent_enum(dumper: yaml.Dumper, member: enum.Enum) -> yaml.Node:
    value = member.value
    if isinstance(value, (str, int, float, bool)):
        return dumper.represent_data(value)
    return dumper.represent_object(member)  # what yaml would have done


def register_enum_representer() -> None:
    """Dump enum members with plain values through ``yaml.dump`` (idempotent)."""
    yaml.add_multi_representer(enum.Enum, _represent_enum, Dumper=yaml.Dumper)
