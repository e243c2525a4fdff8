"""Packed, fixed-length calibration sequences from real text.

Calibration wants every sample to be a full window of real tokens (no padding
that the router/expert statistics would have to ignore), so articles are joined
with eos and cut into equal chunks rather than padded one by one.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    import datasets

__all__ = ["build_calibration_dataset", "pack_token_ids", "token_windows"]


def pack_token_ids(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """Tokenize texts (no special tokens), join with eos, cut into full chunks."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "tokenizer has no eos_token, which separates articles; set "
            "tokenizer.eos_token before building calibration data"
        )
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)
    stream: list[int] = []
    for ids in encoded["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n_chunks = len(stream) // seq_len
    return [stream[i * seq_len : (i + 1) * seq_len] for i in range(n_chunks)]


def token_windows(tokenizer, texts: list[str], context: int) -> list[list[int]]:
    """Each text on its own (with the tokenizer's own BOS, if any), cut into
    disjoint windows of ``context`` tokens; windows shorter than 2 are dropped.
    For measuring a converted model on held-out text (routing, speed prompts)."""
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


def build_calibration_dataset(
    tokenizer,
    texts: list[str],
    seq_len: int,
    num_samples: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """Dataset with ``input_ids``/``attention_mask`` of exactly ``seq_len`` tokens.

    Chunks are shuffled with ``seed`` and the first ``num_samples`` kept (all of
    them when ``num_samples`` is None or larger than what the text yields).
    """
    import datasets

    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 or None, got {num_samples}")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(
            "build_calibration_dataset got no non-empty texts; pass real text, "
            "e.g. tomoe_modifier.assets.load_split('wiki_train')"
        )
    t0 = time.perf_counter()
    chunks = pack_token_ids(tokenizer, texts, seq_len)
    if not chunks:
        raise ValueError(
            f"build_calibration_dataset produced 0 sequences of {seq_len} tokens "
            f"from {len(texts)} texts; lower seq_len or add text"
        )
    order = list(range(len(chunks)))
    random.Random(seed).shuffle(order)
    if num_samples is not None:
        if num_samples > len(chunks):
            logger.warning(
                "asked for {} calibration samples but the text yields only {} of "
                "{} tokens; using all of them",
                num_samples,
                len(chunks),
                seq_len,
            )
        order = order[:num_samples]
    rows = [chunks[i] for i in order]
    ds = datasets.Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows]}
    )
    logger.info(
        "calibration set: {} x {} tokens from {} texts ({} chunks) in {:.1f}s",
        len(rows),
        seq_len,
        len(texts),
        len(chunks),
        time.perf_counter() - t0,
    )
    return ds
