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


def get_layout(model) -> tuple[str, MLPLayout]:
    """Architecture name and MLP layout of ``model``; ValueError if unsupported."""
    arch = type(model).__name__
    if arch in {cls.__name__ for _, cls in TOMOE_ARCHITECTURES.values()}:
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
