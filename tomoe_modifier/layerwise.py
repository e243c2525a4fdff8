"""Layer-local fitting of one MLP's router and expert masks, and the global width
allocation that ties the layers to one budget.

End-to-end distillation pays a teacher forward, a student forward and a backward
through the whole model per step. Fitting one MLP on its captured inputs is far
cheaper. Its objective is the MLP output's normalised error when token t runs only
expert e's channels, ``||W_down((1 - m_e) * h_t)||^2 / ||W_down h_t||^2``; with the
per-channel output energy ``h_tc^2 ||W_down[:, c]||^2`` as its diagonal
approximation, the fit alternates, k-means style, between giving each expert the
channels with the most energy on its tokens and moving each token to the expert
that keeps most of its energy (``cluster_tokens``); then a router learns to predict
that assignment from the MLP input (``fit_router``), and each expert's channels are
recomputed for the tokens the router actually sends it. The exact normalised error
of the result is reported per layer; the end-to-end phase continues from it.

Widths are allocated over the whole model (``allocate_widths``): every (layer,
expert, channel) gets the mean output energy it carries on the expert's tokens,
normalised by its layer's total energy, and one global threshold keeps the highest
such energies per parameter until the budget is spent. Layers and experts whose
energy is spread out get wide experts; concentrated ones get narrow ones.
Dimension legend: T tokens, D hidden, I MLP width, N blocks, E experts, L layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# tokens per slice where a fit computes [T, I] intermediates it does not keep: the
# fit holds 16k tokens x 1536 channels (96 MiB per array on SmolLM2) at a time
FIT_CHUNK_TOKENS = 4096

__all__ = [
    "allocate_widths",
    "block_energy",
    "masked_output_error",
    "fit_mlp_layer",
    "cluster_tokens",
    "dense_activations",
    "disjoint_expert_blocks",
    "expert_blocks",
    "fit_router",
    "normalised_error",
]


@torch.no_grad()
def dense_activations(x: torch.Tensor, gate, up, act_fn) -> torch.Tensor:
    """h = act(gate x) * up x for MLP inputs x [T, D] -> [T, I] (float32)."""
    x = x.float()
    return act_fn(x @ gate.weight.float().t()) * (x @ up.weight.float().t())


def allocate_widths(
    block_energy: list[torch.Tensor],
    assignment: list[torch.Tensor],
    num_experts: int,
    params_per_block: list[int],
    budget: float,
) -> list[torch.Tensor]:
    """
    Blocks per (layer, expert) that spend ``budget`` expert parameters per token.

    :param block_energy: per layer, [T, N] output energy of each block per token
    :param assignment: per layer, the expert of each token [T]
    :param params_per_block: per layer, the parameters one block costs
    :param budget: mean expert parameters per token to spend over all layers
    :return: per layer, blocks per expert [E] (long, each >= 1)
    """
    candidates, costs, owners = [], [], []
    for layer, (energy, expert, cost) in enumerate(
        zip(block_energy, assignment, params_per_block)
    ):
        total = energy.sum(dim=1).mean().clamp_min(1e-30)  # mean energy per token
        share = torch.bincount(expert, minlength=num_experts).double() / len(expert)
        for e in range(num_experts):
            rows = energy[expert == e]
            if len(rows) == 0:
                continue
            gain = (rows.mean(0) / total).double().sort(descending=True).values  # [N]
            # keeping block j of expert e removes share_e * gain_j of the layer's
            # normalised error, at share_e * cost parameters per token
            candidates.append(gain / cost)
            costs.append(torch.full_like(gain, float(share[e] * cost)))
            owners.append(torch.full((len(gain),), layer * num_experts + e))
    order = torch.cat(candidates).argsort(descending=True)
    spent = torch.cat(costs)[order].cumsum(0)
    chosen = torch.cat(owners)[order][spent <= budget]
    counts = torch.bincount(chosen, minlength=len(block_energy) * num_experts)
    counts = counts.view(len(block_energy), num_experts).clamp_min(1)
    return list(counts)


def expert_blocks(
    energy: torch.Tensor, assignment: torch.Tensor, widths: list[int]
) -> torch.Tensor:
    """Each expert's ``widths[e]`` blocks with the most mean energy on its tokens
    (all tokens when it has none). energy [T, N] -> bool [E, N]."""
    masks = torch.zeros(len(widths), energy.shape[1], dtype=torch.bool)
    overall = energy.mean(0)
    for e, width in enumerate(widths):
        rows = energy[assignment == e]
        score = rows.mean(0) if len(rows) else overall
        masks[e, score.topk(int(width)).indices] = True
    return masks


def disjoint_expert_blocks(
    energy: torch.Tensor, assignment: torch.Tensor, widths: list[int]
) -> torch.Tensor:
    """``expert_blocks`` with disjoint experts (the shared layout's routed groups):
    blocks go to the experts whose tokens carry most of their energy."""
    from tomoe_modifier.router import assign_blocks

    overall = energy.mean(0)
    scores = torch.stack(
        [
            energy[assignment == e].mean(0)
            if bool((assignment == e).any())
            else overall
            for e in range(len(widths))
        ]
    )
    return assign_blocks(scores, [int(w) for w in widths])


def cluster_tokens(
    energy: torch.Tensor,
    assignment: torch.Tensor,
    widths: list[int],
    iters: int = 10,
    disjoint: bool = False,
) -> torch.Tensor:
    """
    Alternate: experts keep their best blocks (``expert_blocks``, or
    ``disjoint_expert_blocks``), tokens move to the expert whose blocks keep most
    of their energy. Starts from ``assignment`` [T]; returns the new one [T].
    """
    choose = disjoint_expert_blocks if disjoint else expert_blocks
    for _ in range(iters):
        masks = choose(energy, assignment, widths).float()  # [E, N]
        new = (energy @ masks.t()).argmax(dim=1)  # kept energy per token and expert
        if torch.equal(new, assignment):
            break
        assignment = new
    return assignment


def fit_router(
    x: torch.Tensor,
    labels: torch.Tensor,
    init: torch.Tensor,
    steps: int = 200,
    lr: float = 0.05,
) -> torch.Tensor:
    """Router weight [E, D] that predicts ``labels`` [T] from x [T, D]
    (softmax regression from ``init``, full batch, Adam)."""
    weight = init.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=lr)
    x = x.float()
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(x @ weight.t(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return weight.detach()


def normalised_error(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||y - target||^2 / ||target||^2 (rows are tokens)."""
    error = (y - target).square().sum(-1)
    return (error / target.square().sum(-1).clamp_min(1e-12)).mean()


def block_energy(h: torch.Tensor, down_weight: torch.Tensor, block_size: int):
    """Per-token output energy of every channel block: sum over the block of
    h_c^2 ||W_down[:, c]||^2. h: [T, I] -> [T, N]."""
    norms = down_weight.detach().float().square().sum(dim=0)  # [I]
    energy = h.square().mul_(norms)  # one [T, I] array: the fit's largest
    if block_size == 1:
        return energy
    return energy.view(len(h), -1, block_size).sum(-1)


def masked_output_error(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    blocks: torch.Tensor,
    routed: torch.Tensor,
    block_size: int,
    chunk: int = FIT_CHUNK_TOKENS,
) -> torch.Tensor:
    """``normalised_error`` of the routed experts' output against the dense MLP's,
    ``chunk`` tokens at a time: whole, its masked copy of h and the two outputs
    would be four more [T, I]-sized arrays at the fit's memory peak."""
    weight = down_weight.detach().float()
    total = h.new_zeros((), dtype=torch.float64)
    for start in range(0, len(h), chunk):
        part = h[start : start + chunk]
        keep = blocks[routed[start : start + chunk]]
        keep = keep.repeat_interleave(block_size, dim=-1)
        dense = part @ weight.t()
        error = normalised_error((part * keep) @ weight.t(), dense)
        total += error.double() * len(part)
    return total / len(h)


def fit_mlp_layer(
    x: torch.Tensor,
    h: torch.Tensor,
    down_weight: torch.Tensor,
    *,
    num_experts: int,
    block_size: int,
    budget_blocks: float,
    seed: int = 0,
) -> dict:
    """
    Fit one MLP alone (the layer-wise training mode): k-means start, energy
    clustering, a router fitted to the clusters, and per-expert widths that spend
    ``budget_blocks`` blocks per token on average within this layer.

    :param x: MLP inputs [T, D]; h: dense channel activations [T, I]
    :return: {"router": [E, D], "blocks": bool [E, N], "assignment": [T],
        "error": normalised output error}
    """
    from tomoe_modifier.warm_start import kmeans, router_weight

    energy = block_energy(h, down_weight, block_size)  # [T, N]
    num_blocks = energy.shape[1]
    provisional = max(1, min(num_blocks, round(budget_blocks)))
    centroids = kmeans(x, num_experts, seed=seed)
    unit = F.normalize(x.float(), dim=-1)
    start = (unit @ centroids.T).argmax(-1)
    labels = cluster_tokens(energy, start, [provisional] * num_experts)
    router = fit_router(x, labels, router_weight(centroids, x))
    routed = (x.float() @ router.t()).argmax(-1)
    (widths,) = allocate_widths([energy], [routed], num_experts, [1], budget_blocks)
    blocks = expert_blocks(energy, routed, widths.tolist())
    error = masked_output_error(h, down_weight, blocks, routed, block_size)
    return {
        "router": router,
        "blocks": blocks,
        "assignment": routed,
        "error": float(error),
    }
