"""Static structured-pruning baselines (Wanda-sp and FLAP) for the same active budget.

ToMoE claims that routing each token to a sub-MLP beats simply deleting the same
number of MLP channels for every token. This is that "simply deleting" model: each
intermediate channel c of each MLP is scored by ``||x_c||_2 * ||W_down[:, c]||_2``
(the L2 norm over calibration tokens of the down_proj input, times the norm of the
weights it feeds), the top-k channels are kept, and the result is a plain, smaller
dense model of the same family that every stock tool can load and run.

k is the same in every layer, so ``config.intermediate_size = k`` describes the model,
and is chosen by ToMoE's own budget (``tomoe_modifier.budget``): attention stays dense
and counts, and the active attention+MLP parameters over the dense attention+MLP
parameters is the target, with k rounded to a multiple of ``multiple``.

FLAP (An et al., AAAI 2024, arXiv 2312.11983) is the stronger static method: it
scores channels by the *fluctuation* of their input, ``Var_t(h_c) *
||W_down[:, c]||^2``, standardises the scores per layer and keeps the globally best
ones (so widths differ between layers), and adds the mean contribution of the
removed channels back as a bias, ``W_down[:, removed] @ mean_t(h_removed)``. Here it
prunes MLP channels only (attention dense, as ToMoE at the same budget), and since
no stock dense architecture has per-layer widths and a down_proj bias, the result
is saved as the ToMoE architecture with one expert per layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tomoe_modifier.budget import count_budget
from tomoe_modifier.mappings import MLPLayout, get_layout
from tomoe_modifier.passes import hooked, run_batches

__all__ = [
    "channel_scores",
    "down_input_moments",
    "flap_prune",
    "iter_batches",
    "prune_mlp_channels",
    "prune_with_scores",
    "width_for_ratio",
]


def _mlps(model: nn.Module, layout: MLPLayout) -> list[nn.Module]:
    layers = model.get_submodule(layout.layers)
    return [getattr(layer, layout.mlp) for layer in layers]


def iter_batches(dataset, batch_size: int = 4) -> Iterable[dict]:
    """Batches of ``input_ids``/``attention_mask`` tensors from rows of token ids."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        batch = {"input_ids": torch.tensor(rows["input_ids"])}
        if "attention_mask" in rows:
            batch["attention_mask"] = torch.tensor(rows["attention_mask"])
        yield batch


@torch.no_grad()
def down_input_moments(model: nn.Module, batches: Iterable[dict]) -> dict:
    """
    Per MLP, the sum and sum of squares over calibration tokens of every down_proj
    input channel (float64, [intermediate]); only the decoder stack runs (no LM
    head) and padded positions are left out.

    :return: {"sum": [...], "sumsq": [...], "tokens": n, "samples": sequences}
    """
    _, layout = get_layout(model)
    mlps = _mlps(model, layout)
    downs = [getattr(m, layout.down_proj) for m in mlps]
    sums = [torch.zeros(d.in_features, dtype=torch.float64) for d in downs]
    sumsq = [torch.zeros(d.in_features, dtype=torch.float64) for d in downs]
    valid: list[torch.Tensor | None] = [None]

    def hook(index):
        def accumulate(module, args):
            x = args[0].reshape(-1, module.in_features).double()
            if valid[0] is not None:
                x = x[valid[0]]
            sums[index] += x.sum(dim=0).cpu()
            sumsq[index] += x.square().sum(dim=0).cpu()

        return accumulate

    def note_padding(ids, mask):
        valid[0] = mask.reshape(-1).bool()

    device = next(model.parameters()).device
    backbone = model.get_submodule(layout.layers.rsplit(".", 1)[0])
    was_training = model.training
    model.eval()
    try:
        with hooked((d, "forward_pre", hook(i)) for i, d in enumerate(downs)):
            seen = run_batches(backbone, batches, device, before=note_padding)
    finally:
        model.train(was_training)
    tokens, samples = seen["tokens"], seen["samples"]
    if tokens == 0:
        raise ValueError(
            "the baseline saw no calibration tokens; pass batches with input_ids "
            "(and attention_mask with at least one 1)"
        )
    return {"sum": sums, "sumsq": sumsq, "tokens": tokens, "samples": samples}


def channel_scores(model: nn.Module, batches: Iterable[dict]) -> dict:
    """
    Wanda-sp channel scores of every MLP: ``||x_c||_2 * ||W_down[:, c]||_2``.

    :return: {"scores": [per layer, a float64 tensor of shape [intermediate]],
        "tokens": calibration tokens counted, "samples": sequences seen}
    """
    moments = down_input_moments(model, batches)
    _, layout = get_layout(model)
    downs = [getattr(m, layout.down_proj) for m in _mlps(model, layout)]
    scores = [
        s.sqrt() * d.weight.detach().double().norm(dim=0).cpu()
        for s, d in zip(moments["sumsq"], downs)
    ]
    return {
        "scores": scores,
        "tokens": moments["tokens"],
        "samples": moments["samples"],
    }


@torch.no_grad()
def flap_prune(
    model: nn.Module,
    calibration_batches: Iterable[dict],
    target_active_ratio: float,
    widths: str = "global",
) -> tuple[nn.Module, dict]:
    """
    FLAP on every MLP, in place: fluctuation scores, bias compensation, and the
    kept channels chosen either by one global ranking of the per-layer standardised
    scores (``widths="global"``, FLAP's adaptive structure: per-layer widths) or the
    best ones of each layer at one width for all (``"uniform"``, the paper's UL-UM
    ablation; on a small model the global ranking can starve single layers). The
    model becomes the ToMoE architecture with one expert per layer. Save it with
    ``save_pretrained``.

    :return: the pruned model and a report (per-layer widths, achieved ratio)
    """
    if widths not in ("global", "uniform"):
        raise ValueError(f"widths={widths!r}: use 'global' or 'uniform'")
    from tomoe_modifier.convert import convert_model

    arch, layout = get_layout(model)
    mlps = _mlps(model, layout)
    downs = [getattr(m, layout.down_proj) for m in mlps]
    moments = down_input_moments(model, calibration_batches)
    n = moments["tokens"]
    hidden = model.config.hidden_size
    means, standardised = [], []
    for total, squares, down in zip(moments["sum"], moments["sumsq"], downs):
        mean = total / n
        variance = (squares / n - mean.square()).clamp_min(0)
        score = variance * down.weight.detach().double().square().sum(dim=0).cpu()
        means.append(mean)
        standardised.append((score - score.mean()) / score.std().clamp_min(1e-30))
    indices = list(range(len(mlps)))
    # one router row and one output bias per layer, executed by every token
    budget = count_budget(model, layout, indices, router_params=2 * hidden)
    mlp_widths = [m.mlp_width for m in budget.converted]
    keep_total = round(budget.channel_fraction(target_active_ratio) * sum(mlp_widths))
    if keep_total < len(mlps):
        raise ValueError(
            f"target_active_ratio {target_active_ratio} leaves FLAP fewer channels "
            "than layers; raise it"
        )
    if widths == "global":
        ranked = torch.cat(standardised).argsort(descending=True)[:keep_total]
        flat = torch.zeros(sum(mlp_widths), dtype=torch.bool)
        flat[ranked] = True
        keeps = list(flat.split(mlp_widths))
    else:
        per_layer = keep_total // len(mlps)
        keeps = []
        for score in standardised:
            keep = torch.zeros(score.numel(), dtype=torch.bool)
            keep[score.argsort(descending=True)[:per_layer]] = True
            keeps.append(keep)
    for keep, score in zip(keeps, standardised):  # every layer keeps >= 1 channel
        keep[score.argmax()] = True
    holders, biases = [], []
    for keep, mean, down in zip(keeps, means, downs):
        holder = nn.Module()
        holder.gate = nn.Linear(hidden, 1, bias=False)
        nn.init.zeros_(holder.gate.weight)
        holders.append(holder)
        removed = (~keep).to(down.weight.device)
        weight = down.weight.detach().double()
        bias = weight[:, removed] @ mean.to(weight.device)[removed]  # [D]
        biases.append(bias[None, :].to(down.weight.dtype))
    convert_model(
        model,
        arch,
        layout,
        indices,
        holders,
        [k[None, :] for k in keeps],
        1,
        1,
        1,
        biases,
    )
    converted = count_budget(model, layout)
    kept = [int(k.sum()) for k in keeps]
    report = {
        "method": "flap (Var(h_c) * ||W_down[:, c]||^2, standardised per layer, "
        f"{widths} widths, bias compensation), MLP channels only",
        "target_active_ratio": target_active_ratio,
        "active_ratio": converted.ratio(
            sum(c * k for c, k in zip(converted.params_per_channel, kept))
        ),
        "widths": kept,
        "tokens": n,
        "samples": moments["samples"],
    }
    return model, report


def width_for_ratio(
    model: nn.Module, target_active_ratio: float, multiple: int = 64
) -> dict:
    """
    Uniform MLP width k whose active attention+MLP ratio is closest to the target,
    counted by ``tomoe_modifier.budget`` exactly as ToMoE's budget counts (all
    attention, every kept channel's gate/up rows and down column, the down bias).
    """
    _, layout = get_layout(model)
    return count_budget(model, layout).static_width(target_active_ratio, multiple)


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping ``index`` along ``dim`` (0: outputs, 1: inputs)."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_f, in_f = weight.shape
    bias = linear.bias is not None
    new = nn.Linear(in_f, out_f, bias=bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias:
            b = linear.bias.detach()
            new.bias.copy_(b.index_select(0, index.to(b.device)) if dim == 0 else b)
    return new


@torch.no_grad()
def prune_with_scores(
    model: nn.Module,
    scores: list[torch.Tensor],
    target_active_ratio: float,
    multiple: int = 64,
) -> tuple[nn.Module, dict]:
    """Keep the top-k scored channels of every MLP (k from ``width_for_ratio``)."""
    _, layout = get_layout(model)
    mlps = _mlps(model, layout)
    if len(scores) != len(mlps):
        raise ValueError(
            f"got scores for {len(scores)} MLPs but the model has {len(mlps)}; "
            "compute them with channel_scores on this model"
        )
    plan = width_for_ratio(model, target_active_ratio, multiple)
    k = plan["intermediate_size"]
    kept_mass = []
    for mlp, score in zip(mlps, scores):
        if score.numel() != getattr(mlp, layout.gate_proj).out_features:
            raise ValueError("scores do not match the MLP width; recompute them")
        keep = torch.topk(score, k).indices.sort().values
        kept_mass.append(float(score[keep].sum() / score.sum().clamp_min(1e-30)))
        for name in (layout.gate_proj, layout.up_proj):
            setattr(mlp, name, _slice_linear(getattr(mlp, name), keep, dim=0))
        name = layout.down_proj
        setattr(mlp, name, _slice_linear(getattr(mlp, name), keep, dim=1))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = k
    model.config.intermediate_size = k
    report = {
        "method": "wanda-sp (||x_c||_2 * ||W_down[:, c]||_2), uniform width",
        "target_active_ratio": target_active_ratio,
        "multiple": multiple,
        **plan,
        "score_mass_kept": kept_mass,
    }
    return model, report


def prune_mlp_channels(
    model: nn.Module,
    calibration_batches: Iterable[dict],
    target_active_ratio: float,
    multiple: int = 64,
) -> tuple[nn.Module, dict]:
    """
    Score channels on ``calibration_batches`` and prune every MLP in place to a
    uniform width; save the result with ``save_pretrained`` as a plain model.

    :return: the pruned model and a report (width, achieved active ratio,
        calibration tokens, fraction of score mass kept per layer)
    """
    scored = channel_scores(model, calibration_batches)
    model, report = prune_with_scores(
        model, scored["scores"], target_active_ratio, multiple
    )
    report.update(tokens=scored["tokens"], samples=scored["samples"])
    return model, report
