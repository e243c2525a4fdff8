"""Per-architecture tables: where the MLPs are and which ToMoE classes replace them."""

from __future__ import annotations

from dataclasses import dataclass

from tomoe_modifier.modeling_tomoe import TOMOE_ARCHITECTURES

__all__ = ["MLPLayout", "TOMOE_MLP_LAYOUTS", "get_layout"]


@dataclass(frozen=True)
class MLPLayout:
    """Attribute names of a gated (SwiGLU-style) MLP inside each decoder layer."""

    layers: str = "model.layers"
    mlp: str = "mlp"
    attention: str = "self_attn"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"


_GATED_MLP = MLPLayout()

# architecture name (config.architectures[0]) -> MLP layout
TOMOE_MLP_LAYOUTS: dict[str, MLPLayout] = {
    "LlamaForCausalLM": _GATED_MLP,
    "MistralForCausalLM": _GATED_MLP,
    "Qwen2ForCausalLM": _GATED_MLP,
    "Qwen3ForCausalLM": _GATED_MLP,
}


def get_layout(model, converted: bool = False) -> tuple[str, MLPLayout]:
    """
    Architecture name and MLP layout of ``model``; ValueError if unsupported.

    :param converted: accept (only) a converted ToMoE model, whose layout is its
        dense architecture's; by default only dense models are accepted
    """
    arch = type(model).__name__
    dense_of = {cls.__name__: name for name, (_, cls) in TOMOE_ARCHITECTURES.items()}
    if converted and arch == "Qwen2MoeForCausalLM":  # the shared layout's export
        return arch, _GATED_MLP
    if converted:
        if arch not in dense_of:
            raise ValueError(
                f"{arch} is not a converted ToMoE model (those are "
                f"{sorted(dense_of)}); convert it with ToMoEModifier first"
            )
        return arch, TOMOE_MLP_LAYOUTS[dense_of[arch]]
    if arch in dense_of:
        raise ValueError(
            f"{arch} is already a ToMoE mixture of experts; ToMoE converts dense "
            "models only. Load the original dense checkpoint instead."
        )
    if arch not in TOMOE_MLP_LAYOUTS or arch not in TOMOE_ARCHITECTURES:
        raise ValueError(
            f"No ToMoE MLP layout for {arch} (supported: "
            f"{sorted(TOMOE_MLP_LAYOUTS)}). Add an entry to TOMOE_MLP_LAYOUTS in "
            "tomoe_modifier/mappings.py and TOMOE_ARCHITECTURES in "
            "tomoe_modifier/modeling_tomoe.py."
        )
    return arch, TOMOE_MLP_LAYOUTS[arch]
