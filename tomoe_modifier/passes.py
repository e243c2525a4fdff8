"""Forward passes of calibration batches under temporary hooks.

The warm starts, the output biases, the measured active ratio and the static
baselines all read activations the same way: hooks on some modules, then the
batches through the model. This is that loop, once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["hooked", "run_batches"]


@contextlib.contextmanager
def hooked(hooks: Iterable[tuple[nn.Module, str, Callable]]):
    """Register (module, "forward_pre" | "forward", fn) hooks for the block."""
    handles = []
    try:
        for module, kind, fn in hooks:
            if kind == "forward_pre":
                handles.append(module.register_forward_pre_hook(fn))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_batches(
    module: nn.Module,
    batches: Iterable[dict],
    device,
    *,
    max_tokens: int | None = None,
    before: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> dict:
    """
    Run ``batches`` (dicts with input_ids and an optional attention_mask) through
    ``module`` (a causal LM or its decoder) until ``max_tokens`` real tokens have
    passed; ``before(input_ids, attention_mask)`` runs ahead of each forward (so
    hooks can see which positions are padding). Returns {"tokens", "samples"}.
    """
    tokens = samples = 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        if before is not None:
            before(ids, mask)
        module(input_ids=ids, attention_mask=mask, use_cache=False)
        tokens += int(mask.sum())
        samples += ids.shape[0]
        if max_tokens is not None and tokens >= max_tokens:
            break
    return {"tokens": tokens, "samples": samples}
