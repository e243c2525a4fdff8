"""The weight group size of the quantization that follows ToMoE in one recipe.

A converted MLP stores the union of its experts' channels. Group quantization
(GPTQ W4A16 with ``strategy: group``) splits down_proj's input channels into groups
of ``group_size`` and llm-compressor refuses a layer whose width is not a whole
number of groups, so the union must be padded to that size; without quantization
the padding only stores channels no expert uses (0.6 % of the SmolLM2 folder at
p = 0.5). ToMoE reads the group size off the quantization modifiers later in the
same recipe, which are all built before any ``on_initialize`` runs.
"""

from __future__ import annotations

import math

from compressed_tensors.quantization import QuantizationStrategy
from llmcompressor.core import active_session

__all__ = ["following_group_size"]

_GROUPED = (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP)


def following_group_size(modifier) -> int | None:
    """
    The least common multiple of the weight group sizes of every quantization
    modifier after ``modifier`` in the active session's recipe, or None when no
    later modifier quantizes weights in groups (or ``modifier`` is not in it).
    """
    modifiers = list(active_session().lifecycle.recipe.modifiers)
    position = next((i for i, m in enumerate(modifiers) if m is modifier), None)
    if position is None:
        return None
    sizes = []
    for later in modifiers[position + 1 :]:
        resolve = getattr(later, "resolve_quantization_config", None)
        if resolve is None:
            continue
        for scheme in resolve().config_groups.values():
            weights = scheme.weights
            if weights is not None and weights.strategy in _GROUPED:
                sizes.append(int(weights.group_size))
    return math.lcm(*sizes) if sizes else None
