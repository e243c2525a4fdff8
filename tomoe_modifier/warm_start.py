"""Warm starts for the routers and expert masks: activation-aware and layer-wise.

With a CPU-sized budget (a few hundred thousand tokens instead of the paper's 41M),
training from the dense model spends most steps discovering which channels matter.
This module gives it a head start from one cheap pass over calibration data: the
router starts as nearest-centroid routing over k-means clusters of the MLP inputs,
and each expert starts keeping the channel blocks that contribute most to the MLP
output on its cluster's tokens, already at the target width. The layer-wise start
(``layerwise_start``) goes further: it allocates the widths over the whole model by
the output energy each (layer, expert, block) carries, then fits each layer's router
and masks to reproduce its dense MLP on the captured inputs (``layerwise.py``).
Dimension legend: T tokens, D hidden, N channel blocks, E experts.
"""

from __future__ import annotations

import time

import torch
from loguru import logger

from tomoe_modifier.passes import hooked, run_batches

__all__ = [
    "KEEP_MARGIN",
    "ROUTER_LOGIT_SPREAD",
    "activation_start",
    "collect_mlp_statistics",
    "expert_block_scores",
    "initial_block_logits",
    "kmeans",
    "layerwise_start",
    "router_weight",
    "set_block_logits",
    "shared_start_logits",
]

# An expert starts keeping its chosen blocks with a keep-logit of +KEEP_MARGIN and
# dropping the others at -KEEP_MARGIN (the decoder's ``mask_offset`` is cancelled
# for them), far enough from 0 that the first noisy steps do not flip them.
KEEP_MARGIN = 3.0
# Standard deviation of the initial router logits: a clear but not saturated choice.
ROUTER_LOGIT_SPREAD = 3.0


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Spherical k-means of x: [T, D] -> unit centroids [k, D] (k-means++ start)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    first = torch.randint(len(x), (1,), generator=g)
    centroids = [x[first[0]]]
    for _ in range(1, k):
        sim = torch.stack(centroids) @ x.T  # [c, T]
        dist = (1 - sim.max(dim=0).values).clamp_min(0) + 1e-12
        centroids.append(x[torch.multinomial(dist, 1, generator=g)[0]])
    c = torch.stack(centroids)  # [k, D]
    for _ in range(iters):
        assign = (x @ c.T).argmax(dim=-1)  # [T]
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = torch.nn.functional.normalize(members.mean(dim=0), dim=0)
    return c


def router_weight(
    centroids: torch.Tensor, x: torch.Tensor, spread: float = ROUTER_LOGIT_SPREAD
):
    """Router weight [E, D] whose argmax is the nearest centroid, logits ~spread."""
    logits = x.float() @ centroids.T  # [T, E]
    scale = spread / logits.std().clamp_min(1e-6)
    return centroids * scale


def expert_block_scores(
    block_energy: torch.Tensor, x: torch.Tensor, centroids: torch.Tensor
) -> torch.Tensor:
    """
    Mean block energy [E, N] of the tokens routed to each expert.

    block_energy: [T, N], per token the squared contribution of each channel block to
    the MLP output (sum over the block of h_c^2 * ||W_down[:, c]||^2).
    """
    assign = (torch.nn.functional.normalize(x.float(), dim=-1) @ centroids.T).argmax(-1)
    scores = torch.zeros(len(centroids), block_energy.shape[1])
    for e in range(len(centroids)):
        members = block_energy[assign == e]
        scores[e] = members.mean(0) if len(members) else block_energy.mean(0)
    return scores


def initial_block_logits(
    scores: torch.Tensor, keep: int, on: float, off: float
) -> torch.Tensor:
    """``on`` for each expert's ``keep`` best blocks, ``off`` for the rest. [E, N]"""
    keep = max(1, min(keep, scores.shape[1]))
    top = scores.topk(keep, dim=1).indices
    logits = torch.full_like(scores, off)
    logits.scatter_(1, top, on)
    return logits


def shared_start_logits(
    scores: torch.Tensor,
    overall: torch.Tensor,
    capacity: list[int],
    on: float,
    off: float,
) -> torch.Tensor:
    """
    The shared layout's start: the shared set takes the ``capacity[-1]`` blocks
    with the most output energy over all tokens, then each routed group the blocks
    that matter most to its cluster (``scores`` [E, N], disjoint, ``capacity[e]``
    each). ``on``/``off`` logits [E+1, N] (row E: the shared set).
    """
    from tomoe_modifier.router import assign_blocks

    num_blocks = scores.shape[1]
    shared = torch.zeros(num_blocks, dtype=torch.bool)
    shared[overall.topk(capacity[-1]).indices] = True
    rest = scores.masked_fill(shared[None, :], float("-inf"))
    groups = assign_blocks(rest, capacity[:-1])  # [E, N]
    member = torch.cat([groups, shared[None, :]])  # [E+1, N]
    return torch.where(member, torch.tensor(on), torch.tensor(off))


@torch.no_grad()
def collect_mlp_statistics(
    model, mlps, down_projs, loader, block_size: int, max_tokens: int, device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """
    One dense pass over the first calibration batches. Per MLP: its inputs
    [T, D] and per-token block energies [T, N] (fp32, on CPU, T <= max_tokens).
    """
    inputs: list[list[torch.Tensor]] = [[] for _ in mlps]
    energies: list[list[torch.Tensor]] = [[] for _ in mlps]
    weights = [
        d.weight.detach().float().pow(2).sum(dim=0) for d in down_projs
    ]  # [I]: ||W_down[:, c]||^2

    def capture_input(i):
        def hook(module, args):
            inputs[i].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())

        return hook

    def capture_energy(i):
        def hook(module, args):
            h = args[0].reshape(-1, args[0].shape[-1]).float()  # [T, I]
            e = (h.pow(2) * weights[i]).view(len(h), -1, block_size).sum(-1)
            energies[i].append(e.cpu())

        return hook

    hooks = [(m, "forward_pre", capture_input(i)) for i, m in enumerate(mlps)]
    hooks += [(d, "forward_pre", capture_energy(i)) for i, d in enumerate(down_projs)]
    with hooked(hooks):
        run_batches(model, loader, device, max_tokens=max_tokens)
    return [
        (torch.cat(x)[:max_tokens], torch.cat(e)[:max_tokens])
        for x, e in zip(inputs, energies)
    ]


def activation_start(
    model,
    mlps,
    down_projs,
    routers,
    loader,
    *,
    block_size: int,
    channel_fraction: float,
    mask_offset: float,
    num_tokens: int,
    seed: int,
    device,
) -> None:
    """
    Write the activation-aware start into ``routers`` (in place): each router
    becomes nearest-centroid routing over spherical k-means clusters of its MLP's
    inputs, and each expert keeps the ``channel_fraction`` of blocks that carry most
    output energy on its cluster's tokens.
    """
    t0 = time.perf_counter()
    stats = collect_mlp_statistics(
        model, mlps, down_projs, loader, block_size, num_tokens, device
    )
    num_experts = routers[0].gate.out_features
    on, off = KEEP_MARGIN, -(mask_offset + KEEP_MARGIN)
    for router, (x, energy) in zip(routers, stats):
        centroids = kmeans(x, num_experts, seed=seed)
        weight = router_weight(centroids, x)
        scores = expert_block_scores(energy, x, centroids)
        if hasattr(router, "capacity"):  # the shared layout
            bias = shared_start_logits(scores, energy.mean(0), router.capacity, on, off)
        else:
            keep = round(channel_fraction * scores.shape[1])
            bias = initial_block_logits(scores, keep, on, off)
        with torch.no_grad():
            router.gate.weight.copy_(weight.to(router.gate.weight))
            router.block_bias.copy_(bias.to(router.block_bias))
    logger.info(
        f"ToMoE activation-aware start: {len(stats[0][0])} tokens per layer, "
        f"experts start at {channel_fraction:.3f} of each MLP "
        f"({time.perf_counter() - t0:.1f}s)"
    )


def set_block_logits(router, embedding: torch.Tensor, logits: torch.Tensor) -> None:
    """Make the router's block logits (decoder + offset + bias) equal ``logits``."""
    with torch.no_grad():
        base = router.block_logits(embedding) - router.block_bias
        router.block_bias.copy_((logits - base).to(router.block_bias))


def layerwise_start(
    model,
    mlps,
    down_projs,
    routers,
    hypernet,
    loader,
    *,
    budget,
    target_active_ratio: float,
    block_size: int,
    num_tokens: int,
    seed: int,
    device,
    widths_over: str = "global",
) -> dict:
    """
    Layer-wise warm start (in place; see ``layerwise.py``): per layer, cluster the
    tokens by which channels carry their output energy, fit the router to predict
    the clusters from the MLP input, allocate the widths (``widths_over``:
    "global" over the whole model, "per_layer" the same mean width in every layer,
    split among its experts; the end-to-end phase reallocates) and give each expert
    its best channels for the tokens the router sends it.
    Returns the per-layer normalised MLP output errors.
    """
    from tomoe_modifier.layerwise import (
        allocate_widths,
        cluster_tokens,
        dense_activations,
        disjoint_expert_blocks,
        expert_blocks,
        fit_router,
        normalised_error,
    )

    t0 = time.perf_counter()
    stats = collect_mlp_statistics(
        model, mlps, down_projs, loader, block_size, num_tokens, device
    )
    num_experts = routers[0].gate.out_features
    num_blocks = stats[0][1].shape[1]
    embeddings = hypernet().detach()  # [L, E(+1), K], held fixed while fitting
    shared = hasattr(routers[0], "capacity")
    provisional = max(
        1, round(budget.channel_fraction(target_active_ratio) * num_blocks)
    )
    routed, residuals, shared_sets = [], [], []
    for router, (x, energy) in zip(routers, stats):
        centroids = kmeans(x, num_experts, seed=seed)
        unit = torch.nn.functional.normalize(x.float(), dim=-1)
        start = (unit @ centroids.T).argmax(-1)
        if shared:  # the shared set: the blocks with most energy over all tokens
            shared_set = torch.zeros(num_blocks, dtype=torch.bool)
            shared_set[energy.mean(0).topk(router.capacity[-1]).indices] = True
            energy = energy.masked_fill(shared_set[None, :], 0.0)
            widths = router.capacity[:-1]
        else:
            shared_set, widths = None, [provisional] * num_experts
        labels = cluster_tokens(energy, start, widths, disjoint=shared)
        gate = fit_router(x, labels, router_weight(centroids, x))
        with torch.no_grad():
            router.gate.weight.copy_(gate.to(router.gate.weight))
        routed.append((x.float() @ gate.t()).argmax(-1))
        residuals.append(energy)
        shared_sets.append(shared_set)
    if shared:
        widths = [torch.tensor(r.capacity[:-1]) for r in routers]
    elif widths_over == "per_layer":
        widths = [
            allocate_widths([energy], [assignment], num_experts, [1], provisional)[0]
            for energy, assignment in zip(residuals, routed)
        ]
    else:
        per_block = [c * block_size for c in budget.params_per_channel]
        spend = target_active_ratio * budget.dense_total - budget.fixed_params()
        widths = allocate_widths(residuals, routed, num_experts, per_block, spend)
    layers = []
    for index, router in enumerate(routers):
        x, assignment = stats[index][0], routed[index]
        if shared:
            groups = disjoint_expert_blocks(residuals[index], assignment, widths[index])
            member = torch.cat([groups, shared_sets[index][None, :]])  # [E+1, N]
            target_width = None
        else:
            member = expert_blocks(residuals[index], assignment, widths[index].tolist())
            share = torch.bincount(assignment, minlength=num_experts).float() / len(x)
            target_width = float(share @ widths[index].float()) * block_size
        logits = torch.where(member, torch.tensor(KEEP_MARGIN), -KEEP_MARGIN)
        set_block_logits(router, embeddings[index], logits)
        mlp = mlps[index]
        h = dense_activations(x, mlp.gate_proj, mlp.up_proj, mlp.act_fn)
        weight = down_projs[index].weight.detach().float()
        error = _local_error(
            router, embeddings[index], x, h, weight, block_size, normalised_error
        )
        layers.append({"target_width": target_width, "error": error})
    errors = [round(layer["error"], 3) for layer in layers]
    logger.info(
        f"ToMoE layer-wise start: {len(stats[0][0])} tokens per layer, normalised "
        f"MLP output error per layer {errors} ({time.perf_counter() - t0:.1f}s)"
    )
    return {"layers": layers, "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def _local_error(router, embedding, x, h, weight, block_size, error_fn) -> float:
    """Normalised MLP output error of a router and its noise-free masks."""
    choice, _ = router.route(x.float(), 1.0, 0.0)
    masks = router.layer_masks(embedding, 1.0, 0.0)
    multiplier = choice @ masks.routed
    if masks.shared is not None:
        multiplier = multiplier + router.token_scale(x)[:, None] * masks.shared
    multiplier = multiplier.repeat_interleave(block_size, dim=-1)
    return float(error_fn((h * multiplier) @ weight.t(), h @ weight.t()))
