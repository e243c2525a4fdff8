"""Data-parallel calibration under ``torchrun``: every rank trains on its shard of the
calibration data (llm-compressor partitions it by rank) and the ranks stay in step.

Gradients of the trainable router parameters are averaged across ranks before each
optimizer step, as DDP would (the language model itself is frozen, so wrapping it
in DDP would add nothing but hooks); statistics that a fit needs from all of the
data (sums and counts) are summed; and the warm start, computed per rank, is
replaced by rank 0's so all ranks start from the same routers. Rank 0 writes the
checkpoint and reports (llm-compressor's save already runs on it alone). Every
function is a no-op without an initialised process group (gloo on CPU, NCCL on
GPUs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "average_gradients",
    "barrier",
    "broadcast_parameters",
    "gather_across_ranks",
    "is_distributed",
    "is_main_process",
    "sum_across_ranks",
    "world_size",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over all ranks (a new tensor)."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def barrier() -> None:
    """Wait for every rank (no-op outside torchrun). Before a rewrite of weights that
    the ranks may share (llm-compressor's distributed CPU offload maps one copy into
    every rank): all ranks read the old values first, then all write the same new
    ones, so none permutes what another already permuted."""
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over ranks, in place, in one reduction
    (a missing gradient counts as zero, so every rank reduces the same buffer)."""
    if not is_distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        count = g.numel()
        chunk = flat[offset : offset + count].view_as(g).to(g.dtype)
        if p.grad is None:
            p.grad = chunk
        else:
            p.grad.copy_(chunk)
        offset += count


@torch.no_grad()
def broadcast_parameters(modules) -> None:
    """Give every rank rank 0's parameters and buffers of ``modules``."""
    if not is_distributed():
        return
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def gather_across_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` [n_r, ...] concatenated in rank order, on every rank."""
    if not is_distributed():
        return rows
    size = torch.tensor([rows.shape[0]])
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(n)] for g, n in zip(gathered, sizes)])
