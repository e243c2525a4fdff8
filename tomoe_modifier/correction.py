"""Closed-form per-expert output correction (FLAP-style bias compensation).

A token routed to expert e computes only e's channels; the channels e drops would
have added ``W_down[:, dropped] @ h_t[dropped]``. Their mean over the calibration
tokens routed to e is a constant vector b_e that the expert adds back, which removes
the mean of the error at the cost of D parameters per expert (the model's weights
stay untouched). With one expert this is FLAP's bias. It is computed after
training, on the dense model's own trajectory, with the trained router and the
noise-free masks that conversion exports.
Dimension legend: T tokens, D hidden, I MLP width, E experts, N blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tomoe_modifier.distributed import sum_across_ranks
from tomoe_modifier.passes import hooked, run_batches
from tomoe_modifier.router import LayerMasks, LayerRouter

__all__ = ["expert_output_biases"]


@torch.no_grad()
def expert_output_biases(
    model,
    mlps,
    down_projs,
    routers: list[LayerRouter],
    masks: list[LayerMasks],
    loader,
    *,
    block_size: int,
    num_tokens: int,
    device,
) -> list[torch.Tensor]:
    """Per converted MLP, b [E, D] (the down_proj weight's dtype), from one dense
    pass over at most ``num_tokens`` calibration tokens."""
    num_experts = routers[0].gate.out_features
    sums = [
        torch.zeros(num_experts, d.in_features, dtype=torch.float64) for d in down_projs
    ]
    counts = [torch.zeros(num_experts, dtype=torch.float64) for _ in down_projs]
    routed: list[torch.Tensor | None] = [None] * len(mlps)
    valid: list[torch.Tensor | None] = [None]

    def route(index):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            routed[index] = routers[index].gate(x).argmax(dim=-1)  # [T]

        return hook

    def accumulate(index):
        def hook(module, args):
            h = args[0].reshape(-1, module.in_features).double()  # [T, I]
            choice = F.one_hot(routed[index], num_experts).double()  # [T, E]
            choice = choice * valid[0][:, None]
            sums[index] += (choice.t() @ h).cpu()
            counts[index] += choice.sum(dim=0).cpu()

        return hook

    def note_padding(ids, mask):
        valid[0] = mask.reshape(-1).double()

    hooks = [(m, "forward_pre", route(i)) for i, m in enumerate(mlps)]
    hooks += [(d, "forward_pre", accumulate(i)) for i, d in enumerate(down_projs)]
    with hooked(hooks):
        run_batches(model, loader, device, max_tokens=num_tokens, before=note_padding)
    biases = []
    for total, count, layer_masks, down in zip(sums, counts, masks, down_projs):
        total, count = sum_across_ranks(total), sum_across_ranks(count)
        mean = total / count.clamp_min(1)[:, None]  # [E, I]
        keep = layer_masks.experts.bool().cpu().repeat_interleave(block_size, dim=1)
        dropped = mean * (~keep).double()  # [E, I]
        weight = down.weight.detach().double().cpu()  # [D, I]
        biases.append((dropped @ weight.t()).to(down.weight))  # [E, D]
    return biases
