"""Measure what a converted model executes: active parameters per token, memory."""

from __future__ import annotations

import torch
from torch import nn

from tomoe_modifier.budget import count_budget
from tomoe_modifier.mappings import get_layout
from tomoe_modifier.modeling_tomoe import ToMoESparseMLP
from tomoe_modifier.passes import hooked, run_batches

__all__ = ["active_parameter_stats", "active_ratio_on_text", "peak_rss_mib"]


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


def _is_stock_moe(mlp: nn.Module) -> bool:
    return hasattr(mlp, "shared_expert") and hasattr(mlp, "experts")


def _expert_widths(moe: nn.Module) -> torch.Tensor:
    """Channels each expert runs (the shared expert included), [E]."""
    if isinstance(moe, ToMoESparseMLP):
        return moe.expert_widths().cpu()
    shared = moe.shared_expert.gate_proj.out_features
    routed = moe.gate.weight.shape[0]
    width = _routed_width(moe.experts)
    return torch.full((routed,), shared + width, dtype=torch.long)


def _routed_width(experts: nn.Module) -> int:
    """Channels of one routed expert of a stock (fused or linearised) MoE."""
    if hasattr(experts, "gate_up_proj"):
        return experts.gate_up_proj.shape[1] // 2
    return experts[0].gate_proj.out_features


@torch.no_grad()
def active_parameter_stats(model: nn.Module, batches) -> dict:
    """
    Run ``batches`` (dicts with input_ids and optional attention_mask) through a
    converted model and count, per real token, the attention + MLP parameters it
    used, relative to the dense model (``tomoe_modifier.budget``, as in training).

    :return: mean and worst observed ratio, the structural worst case (every layer
        routing to its widest expert), token count and expert usage per layer
    """
    _, layout = get_layout(model, converted=True)
    budget = count_budget(model, layout)
    layers = model.get_submodule(layout.layers)
    mlps = [getattr(layer, layout.mlp) for layer in layers]
    moes = [m for m in mlps if isinstance(m, ToMoESparseMLP) or _is_stock_moe(m)]
    if not moes:
        raise ValueError("model has no ToMoE MoE layers; convert it first")

    choices: list[list[torch.Tensor]] = [[] for _ in moes]

    def capture_tomoe(index):
        def hook(module, args):
            x = args[0].reshape(-1, module.hidden_size)
            logits = module.router(x.to(module.router.weight.dtype))
            choices[index].append(logits.argmax(-1).cpu())

        return hook

    def capture_stock(index):
        def hook(module, args, output):
            choices[index].append(output[2][:, 0].cpu())  # top-1 expert indices

        return hook

    hooks = [
        (moe, "forward_pre", capture_tomoe(i))
        if isinstance(moe, ToMoESparseMLP)
        else (moe.gate, "forward", capture_stock(i))
        for i, moe in enumerate(moes)
    ]
    valid_masks = []
    device = next(model.parameters()).device
    with hooked(hooks):
        run_batches(
            model,
            batches,
            device,
            before=lambda ids, mask: valid_masks.append(mask.reshape(-1).bool().cpu()),
        )
    valid = torch.cat(valid_masks)
    expert_ids = [torch.cat(chosen)[valid] for chosen in choices]
    widths = [_expert_widths(moe) for moe in moes]
    per_token = budget.token_params(expert_ids, widths)
    usage = [
        (
            torch.bincount(ids, minlength=len(expert_widths)).double()
            / max(1, ids.numel())
        ).tolist()
        for ids, expert_widths in zip(expert_ids, widths)
    ]
    return {
        "active_ratio_mean": float(per_token.mean() / budget.dense_total),
        "active_ratio_worst_observed": float(per_token.max() / budget.dense_total),
        "active_ratio_worst_case": budget.ratio(budget.worst_case_params(widths)),
        "tokens": int(valid.sum()),
        "expert_usage": usage,
        "dense_attention_mlp_params": budget.dense_total,
    }


def active_ratio_on_text(
    model: nn.Module, tokenizer, texts: list[str], context: int = 512, windows: int = 24
) -> dict:
    """``active_parameter_stats`` on the first ``windows`` windows of ``context``
    tokens of ``texts`` (each text tokenized on its own)."""
    from tomoe_modifier.assets.calibration import token_windows

    chosen = token_windows(tokenizer, texts, context)[:windows]
    if not chosen:
        raise ValueError("no window of >= 2 tokens in texts; pass longer texts")
    return active_parameter_stats(
        model, [{"input_ids": torch.tensor([w])} for w in chosen]
    )
