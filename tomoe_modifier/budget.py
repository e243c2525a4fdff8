"""The active-parameter budget: the one place that counts parameters.

ToMoE's target, its feasibility check, its report, the measured active ratio of a
converted model and the width of the static baseline are all ratios of the same two
counts, so they are computed here and nowhere else:

- **dense**: every attention parameter plus every full MLP (the paper's reference);
- **active per token**: what the model executes for that token: the attention it
  runs, every MLP left dense, each converted MLP's router and always-executed
  biases, and ``params_per_channel`` for each MLP channel of the token's expert.

Counts come from module shapes, so a dense model and its converted form give the
same dense reference. Attention pruning (kept q/k head dimensions per layer) is
counted through ``LayerCount.qk_params_per_dim``.
Dimension legend: L decoder layers, E experts, W expert width (channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tomoe_modifier.mappings import MLPLayout

__all__ = [
    "Budget",
    "LayerCount",
    "count_budget",
    "count_layer",
]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class LayerCount:
    """Parameter counts of one decoder layer, dense and as the converted model runs."""

    attention: int  # all attention parameters (q, k, v, o, biases, norms inside)
    qk_params_per_dim: int  # parameters per q/k head dimension kept in every head
    head_dim: int
    mlp: int  # the dense MLP
    mlp_width: int  # I: dense MLP channels
    params_per_channel: int  # per kept channel: gate and up rows, down column, biases
    mlp_fixed: int  # executed whatever the routing (the down_proj bias)
    converted: bool
    router: int  # router (and gate) parameters of a converted MLP
    qk_dims: int | None = None  # q/k dims kept per head after attention pruning

    def attention_params(self, qk_dims: int | None = None) -> int:
        """Attention parameters executed when ``qk_dims`` q/k dims per head are kept
        (default: what this layer keeps)."""
        qk_dims = self.qk_dims if qk_dims is None else qk_dims
        if qk_dims is None:
            return self.attention
        return self.attention - self.qk_params_per_dim * (self.head_dim - qk_dims)


def count_layer(
    layer: nn.Module, layout: MLPLayout, config, router_params: int = 0
) -> LayerCount:
    """Counts of one decoder layer, dense or already converted to ToMoE."""
    attention = getattr(layer, layout.attention)
    mlp = getattr(layer, layout.mlp)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q = getattr(attention, "q_proj", None)
    qk_bias = int(q is not None and q.bias is not None)
    qk_per_dim = (heads + kv_heads) * (config.hidden_size + qk_bias)
    hidden = config.hidden_size
    attention_params = _numel(attention)
    qk_dims = None
    if hasattr(attention, "qk_index"):  # q/k head dims pruned by ToMoE
        qk_dims = attention.qk_index.numel()
        attention_params += qk_per_dim * (head_dim - qk_dims)  # the dense count
    if hasattr(mlp, "shared_expert"):  # a stock Qwen2-MoE block (shared layout)
        return LayerCount(
            attention=attention_params,
            qk_params_per_dim=qk_per_dim,
            head_dim=head_dim,
            mlp=3 * hidden * config.intermediate_size,
            mlp_width=config.intermediate_size,
            params_per_channel=3 * hidden,
            mlp_fixed=0,
            converted=True,
            router=_numel(mlp.gate) + _numel(mlp.shared_expert_gate),
            qk_dims=qk_dims,
        )
    if hasattr(mlp, "union_size"):  # a converted ToMoESparseMLP
        width = config.intermediate_size
        bias = mlp.gate_up_proj.bias is not None
        per_channel = 3 * hidden + 2 * int(bias)
        fixed = 0 if mlp.down_proj.bias is None else mlp.down_proj.bias.numel()
        if mlp.expert_bias is not None:  # one expert's output vector per token
            fixed += hidden
        router = _numel(mlp.router)
        if mlp.shared_gate is not None:
            router += _numel(mlp.shared_gate)
        return LayerCount(
            attention=attention_params,
            qk_params_per_dim=qk_per_dim,
            head_dim=head_dim,
            mlp=per_channel * width + fixed,
            mlp_width=width,
            params_per_channel=per_channel,
            mlp_fixed=fixed,
            converted=True,
            router=router,
            qk_dims=qk_dims,
        )
    gate = getattr(mlp, layout.gate_proj)
    up = getattr(mlp, layout.up_proj)
    down = getattr(mlp, layout.down_proj)
    per_channel = (
        gate.in_features
        + up.in_features
        + down.out_features
        + int(gate.bias is not None)
        + int(up.bias is not None)
    )
    return LayerCount(
        attention=_numel(attention),
        qk_params_per_dim=qk_per_dim,
        head_dim=head_dim,
        mlp=_numel(gate) + _numel(up) + _numel(down),
        mlp_width=gate.out_features,
        params_per_channel=per_channel,
        mlp_fixed=0 if down.bias is None else down.bias.numel(),
        converted=router_params > 0,
        router=router_params,
        qk_dims=qk_dims,
    )


def count_budget(
    model: nn.Module,
    layout: MLPLayout,
    converted: list[int] | None = None,
    router_params: int = 0,
) -> Budget:
    """
    Budget of ``model``. On a dense model, ``converted`` lists the decoder layers
    ToMoE will convert and ``router_params`` is each one's router size; on a
    converted model both come from the modules.
    """
    layers = model.get_submodule(layout.layers)
    chosen = set(converted or ())
    return Budget(
        [
            count_layer(
                layer, layout, model.config, router_params if i in chosen else 0
            )
            for i, layer in enumerate(layers)
        ]
    )


@dataclass(frozen=True)
class Budget:
    """Active attention+MLP parameters per token over the dense model's count."""

    layers: list[LayerCount]

    @property
    def converted(self) -> list[LayerCount]:
        return [c for c in self.layers if c.converted]

    @property
    def dense_total(self) -> int:
        return sum(c.attention + c.mlp for c in self.layers)

    @property
    def params_per_channel(self) -> list[int]:
        """Per converted layer, the parameters one kept MLP channel costs."""
        return [c.params_per_channel for c in self.converted]

    @property
    def full_mlp_params(self) -> list[int]:
        """Per converted layer, its dense MLP's parameters."""
        return [c.mlp for c in self.converted]

    def fixed_params(self, qk_dims: list[int] | None = None) -> int:
        """Executed by every token: attention, dense MLPs, routers, down biases."""
        qk = qk_dims or [None] * len(self.layers)
        total = 0
        for c, dims in zip(self.layers, qk):
            total += c.attention_params(dims)
            total += c.router + c.mlp_fixed if c.converted else c.mlp
        return total

    def ratio(self, expert_params, attention_saving=0.0):
        """(fixed - ``attention_saving`` + ``expert_params``) / dense; a tensor stays
        a tensor (for gradients)."""
        fixed = self.fixed_params()
        if not isinstance(attention_saving, float) or attention_saving:
            fixed = fixed - attention_saving
        return (fixed + expert_params) / self.dense_total

    def attention_saving(self, kept_pairs: list):
        """Attention parameters saved per token when converted layer l keeps
        ``kept_pairs[l]`` RoPE pairs (2 q/k dims each) of every head; differentiable."""
        total = 0.0
        for c, pairs in zip(self.converted, kept_pairs):
            total = total + c.qk_params_per_dim * (c.head_dim - 2 * pairs)
        return total

    def expert_params(self, widths: list, usage: list):
        """
        Mean expert parameters per token. widths[l]: channels per expert [E];
        usage[l]: share of tokens per expert [E]. Differentiable in both.
        """
        total = 0.0
        for per_channel, w, f in zip(self.params_per_channel, widths, usage):
            total = total + per_channel * (w * f).sum()
        return total

    def worst_case_params(self, widths: list) -> float:
        """Expert parameters of a token that picks every layer's widest expert."""
        return float(
            sum(
                c * float(torch.as_tensor(w).detach().max())
                for c, w in zip(self.params_per_channel, widths)
            )
        )

    def floor(self, min_channels: int = 1) -> float:
        """Smallest reachable ratio: ``min_channels`` per converted MLP."""
        return self.ratio(sum(c * min_channels for c in self.params_per_channel))

    def channel_fraction(self, target: float) -> float:
        """Fraction of every converted MLP's channels that meets ``target``."""
        return (target * self.dense_total - self.fixed_params()) / sum(
            self.full_mlp_params
        )

    def summary(self, widths: list) -> dict:
        """Report of final expert widths: ratio with uniform routing and worst case."""
        uniform = [
            torch.full((len(w),), 1 / len(w), dtype=torch.float64) for w in widths
        ]
        widths = [torch.as_tensor(w, dtype=torch.float64) for w in widths]
        return {
            "active_ratio_uniform_routing": float(
                self.ratio(self.expert_params(widths, uniform))
            ),
            "active_ratio_worst_case": float(
                self.ratio(self.worst_case_params(widths))
            ),
        }

    def shared_widths(
        self, target: float, num_experts: int, multiple: int = 64
    ) -> tuple[int, int]:
        """
        Channels (S, R) of the "shared" layout, the same in every converted MLP: a
        shared set of S and E disjoint routed groups of R, so a token runs S + R.
        S + R is the multiple of ``multiple`` whose ratio is closest to ``target``;
        R is the largest multiple that still stores S + E * R <= the dense width,
        which leaves the most room for routing.
        """
        widths = {c.mlp_width for c in self.converted}
        if len(widths) != 1:
            raise ValueError(
                f"expert_layout 'shared' needs one MLP width in all converted layers, "
                f"got {sorted(widths)}; convert layers of one width or use 'paper'"
            )
        (width,) = widths
        exact = self.channel_fraction(target) * width
        active = int(round(exact / multiple)) * multiple
        active = max(multiple, min(active, width))
        routed = (width - active) // (num_experts - 1) // multiple * multiple
        routed = min(routed, active)
        if routed < multiple:
            raise ValueError(
                f"expert_layout 'shared' with {num_experts} experts at "
                f"target_active_ratio {target} leaves no routed group of "
                f"{multiple} channels within the dense width ({active} active of "
                f"{width}, shared + {num_experts} groups stored at most once): lower "
                "num_experts, width_multiple or target_active_ratio"
            )
        return active - routed, routed

    def static_width(self, target: float, multiple: int = 64) -> dict:
        """
        One MLP width k for every layer whose ratio is closest to ``target``, as a
        static channel-pruned model (no router) executes it. k is a multiple of
        ``multiple`` and at most the dense width.
        """
        if not 0 < target <= 1:
            raise ValueError(f"target_active_ratio must be in (0, 1], got {target}")
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        attention = sum(c.attention for c in self.layers)
        fixed = attention + sum(c.mlp_fixed for c in self.layers)
        per_channel = sum(c.params_per_channel for c in self.layers)
        exact = (target * self.dense_total - fixed) / per_channel
        if exact <= 0:
            raise ValueError(
                f"target_active_ratio {target} is at or below the dense attention "
                f"share {fixed / self.dense_total:.3f}; no MLP channel would remain. "
                "Raise it."
            )
        width = self.layers[0].mlp_width
        k = int(math.floor(exact / multiple + 0.5)) * multiple
        k = max(multiple, min(k, width))
        return {
            "intermediate_size": k,
            "dense_intermediate_size": width,
            "exact_width": exact,
            "active_ratio": (fixed + per_channel * k) / self.dense_total,
            "attention_share": attention / self.dense_total,
            "dense_attention_mlp_params": self.dense_total,
        }

    def token_params(self, expert_ids: list, widths: list) -> torch.Tensor:
        """
        Active parameters of each token of a converted model, float64 [T].
        expert_ids[l]: the expert each token picked in converted layer l [T];
        widths[l]: channels per expert [E].
        """
        per_token = torch.full(
            (expert_ids[0].numel(),), float(self.fixed_params()), dtype=torch.float64
        )
        for c, ids, w in zip(self.params_per_channel, expert_ids, widths):
            per_token += c * torch.as_tensor(w, dtype=torch.float64)[ids]
        return per_token
