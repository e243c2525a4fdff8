"""Run a shared-layout checkpoint (stock Qwen2-MoE) through ToMoE's CPU expert kernel.

transformers' Qwen2-MoE block computes a shared expert, its sigmoid gate, a softmax
router with top-k and the routed experts as some twenty small ops per layer, each
with a fixed cost that at batch 1 on a CPU is comparable to the expert's own work
(and several times that in bfloat16, whose small GEMMs go through oneDNN).
``use_cpu_kernels`` rebuilds each block as the equivalent ``ToMoESparseMLP`` with a
gated shared set, whose forward is one routing matmul and one kernel call that reads
only the shared and the routed channels. It computes the same function (tested);
the checkpoint on disk is unchanged and stays loadable without this package.
Dimension legend: D hidden, S shared width, E experts, R routed width, U = S + E R.
"""

from __future__ import annotations

import torch
from loguru import logger
from torch import nn

from tomoe_modifier.modeling_tomoe import ToMoESparseMLP

__all__ = ["use_cpu_kernels"]


def _expert_rows(experts: nn.Module, index: int):
    """(gate [R, D], up [R, D], down [D, R]) of one routed expert, fused or linear."""
    if hasattr(experts, "gate_up_proj"):  # transformers' fused 3-D experts
        gate, up = experts.gate_up_proj[index].chunk(2, dim=0)
        return gate, up, experts.down_proj[index]
    expert = experts[index]  # llm-compressor's linearised experts
    return expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight


@torch.no_grad()
def _as_tomoe_mlp(block: nn.Module, hidden_act: str) -> ToMoESparseMLP:
    shared = block.shared_expert
    num_experts, hidden = block.gate.weight.shape
    parts = [(shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)]
    parts += [_expert_rows(block.experts, e) for e in range(num_experts)]
    gate = torch.cat([p[0] for p in parts])  # [U, D]
    up = torch.cat([p[1] for p in parts])  # [U, D]
    down = torch.cat([p[2] for p in parts], dim=1)  # [D, U]
    shared_size, routed_size = parts[0][0].shape[0], parts[1][0].shape[0]
    union = gate.shape[0]
    moe = ToMoESparseMLP(hidden, union, num_experts, 1, hidden_act, shared=True)
    moe.to(dtype=gate.dtype)
    moe.gate_up_proj.weight.copy_(torch.stack([gate, up], dim=1).reshape(2 * union, -1))
    moe.down_proj.weight.copy_(down)
    moe.router.float().weight.copy_(block.gate.weight.float())
    moe.shared_gate.float().weight.copy_(block.shared_expert_gate.weight.float())
    blocks = torch.zeros(num_experts, union, dtype=torch.bool)
    blocks[:, :shared_size] = True
    for e in range(num_experts):
        start = shared_size + e * routed_size
        blocks[e, start : start + routed_size] = True
    moe.expert_blocks.copy_(blocks)
    moe.shared_blocks[:shared_size] = True
    return moe.requires_grad_(False).eval()


def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """
    Replace, in place, every Qwen2-MoE sparse block of ``model`` (a shared-layout
    export: top-1 routing with ``norm_topk_prob``) by the equivalent
    ``ToMoESparseMLP``, so CPU inference runs ToMoE's expert kernel. Quantized
    models are left as they are. Returns ``model``.
    """
    config = model.config
    if getattr(config, "num_experts_per_tok", None) != 1 or not getattr(
        config, "norm_topk_prob", False
    ):
        raise ValueError(
            "use_cpu_kernels needs top-1 routing with norm_topk_prob (a ToMoE "
            "shared-layout export); this model routes "
            f"{getattr(config, 'num_experts_per_tok', None)} experts per token"
        )
    if getattr(config, "quantization_config", None):
        logger.warning("use_cpu_kernels: quantized model left on its own path")
        return model
    converted = 0
    for layer in model.model.layers:
        block = layer.mlp
        if hasattr(block, "shared_expert") and hasattr(block, "experts"):
            device = block.gate.weight.device
            layer.mlp = _as_tomoe_mlp(block, config.hidden_act).to(device)
            converted += 1
    logger.info(f"use_cpu_kernels: {converted} MoE blocks run ToMoE's CPU kernel")
    return model
