"""Token-level perplexity of a causal LM on a list of texts.

Each text is scored on its own (so articles never condition on each other), in
non-overlapping windows of ``context`` tokens. This is the cheap standard
(no sliding stride): every token is predicted exactly once, with the first
token of each window serving only as context.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from loguru import logger

__all__ = ["perplexity", "token_windows"]


def token_windows(tokenizer, texts: list[str], context: int) -> list[list[int]]:
    """Tokenize each text (with the tokenizer's own BOS, if any) into windows."""
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=True, verbose=False)
    windows: list[list[int]] = []
    for ids in encoded["input_ids"]:
        for start in range(0, len(ids), context):
            window = ids[start : start + context]
            if len(window) >= 2:
                windows.append(window)
    return windows


def perplexity(
    model, tokenizer, texts: list[str], context: int = 512, batch_size: int = 4
) -> dict:
    """Return {"perplexity", "nll_sum", "tokens"} over all predicted tokens."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    windows = token_windows(tokenizer, texts, context)
    if not windows:
        raise ValueError(
            f"no window of >= 2 tokens in {len(texts)} texts; pass longer texts"
        )
    # Longest first: batches hold similar lengths, so little compute is padding.
    windows.sort(key=len, reverse=True)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    nll_sum = 0.0
    n_tokens = 0
    try:
        with torch.inference_mode():
            for b in range(0, len(windows), batch_size):
                batch = windows[b : b + batch_size]
                width = len(batch[0])
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, window in enumerate(batch):
                    ids[row, : len(window)] = torch.tensor(window)
                    mask[row, : len(window)] = 1
                ids, mask = ids.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits
                logits = logits[:, :-1].float()
                targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)),
                    targets.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                nll_sum += nll.item()
                n_tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    ppl = math.exp(nll_sum / n_tokens)
    logger.info(
        "perplexity {:.3f} over {} tokens ({} windows of <= {}) in {:.1f}s",
        ppl,
        n_tokens,
        len(windows),
        context,
        time.perf_counter() - t0,
    )
    return {"perplexity": ppl, "nll_sum": nll_sum, "tokens": n_tokens}
