"""Measure what a converted model actually executes: active parameters per token."""

from __future__ import annotations

import torch
from torch import nn

from tomoe_modifier.modeling_tomoe import ToMoESparseMLP

__all__ = ["active_parameter_stats", "peak_rss_mib"]


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB.

    Reads ``VmHWM`` (Linux): ``ru_maxrss`` survives ``exec``, so a probe started
    from a big parent process would report the parent's peak instead of its own.
    """
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def active_parameter_stats(model: nn.Module, batches) -> dict:
    """
    Run ``batches`` (dicts with input_ids and optional attention_mask) through a
    converted model and count, per real token, the attention + MLP parameters it
    used, relative to the dense model (attention + full MLPs, as in the budget).

    :return: mean and worst observed ratio, the structural worst case (every layer
        routing to its widest expert), token count and expert usage per layer
    """
    config = model.config
    layers = model.model.layers
    hidden, dense_width = config.hidden_size, config.intermediate_size
    attention = sum(_params(layer.self_attn) for layer in layers)
    dense_total = attention
    fixed = attention
    moes: list[ToMoESparseMLP] = []
    for layer in layers:
        mlp = layer.mlp
        if isinstance(mlp, ToMoESparseMLP):
            per_channel = 3 * hidden + (2 if mlp.gate_up_proj.bias is not None else 0)
            down_bias = 0 if mlp.down_proj.bias is None else hidden
            dense_total += per_channel * dense_width + down_bias
            fixed += _params(mlp.router) + down_bias
            moes.append(mlp)
        else:
            dense_total += _params(mlp)
            fixed += _params(mlp)
    if not moes:
        raise ValueError("model has no ToMoESparseMLP layers; convert it first")

    choices: list[list[torch.Tensor]] = [[] for _ in moes]

    def capture(index):
        def hook(module, args):
            x = args[0].reshape(-1, module.hidden_size)
            choices[index].append(module.router(x).argmax(-1).cpu())

        return hook

    handles = [m.register_forward_pre_hook(capture(i)) for i, m in enumerate(moes)]
    valid_masks = []
    device = next(model.parameters()).device
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            valid_masks.append(mask.reshape(-1).bool().cpu())
    finally:
        for h in handles:
            h.remove()
    valid = torch.cat(valid_masks)
    per_token = torch.full((int(valid.sum()),), float(fixed), dtype=torch.float64)
    usage = []
    for moe, chosen in zip(moes, choices):
        ids = torch.cat(chosen)[valid]
        per_channel = 3 * hidden + (2 if moe.gate_up_proj.bias is not None else 0)
        widths = moe.expert_widths().cpu().double()
        per_token += per_channel * widths[ids]
        counts = torch.bincount(ids, minlength=moe.num_experts)
        usage.append((counts.double() / max(1, ids.numel())).tolist())
    structural = fixed + sum(
        (3 * hidden + (2 if m.gate_up_proj.bias is not None else 0))
        * int(m.expert_widths().max())
        for m in moes
    )
    return {
        "active_ratio_mean": float(per_token.mean() / dense_total),
        "active_ratio_worst_observed": float(per_token.max() / dense_total),
        "active_ratio_worst_case": structural / dense_total,
        "tokens": int(valid.sum()),
        "expert_usage": usage,
        "dense_attention_mlp_params": dense_total,
    }
