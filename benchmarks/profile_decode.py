"""
Where does decode (and prefill) time go? Time of attention, MLP, lm_head and the rest.

    python -m benchmarks.profile_decode DENSE_DIR MODEL_DIR [MODEL_DIR ...] \\
        --out outputs/bench/results/profile.json [--dtype float32] [--rounds 3]

Each model decodes ``--new-tokens`` (128) tokens greedily after a ``--prompt-tokens``
(64) prompt with KV cache, batch 1, ``--threads`` 2, models alternating per round.
Forward hooks time every decoder layer's ``self_attn`` and ``mlp`` and the
``lm_head``; "other" is the rest of the ``generate`` call (embeddings, norms,
residual adds, the generation loop, sampling). The hooks themselves add a little
time, so the hooked total is reported next to the unhooked one. The same parts are
timed for one ``--prefill-tokens`` (512) forward without cache (ms per forward;
0 skips it). This is the profile
the issue asks for when a speed target is missed: it shows which part of a token's
time the MoE MLP can shrink at all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks.common import (
    common_parser,
    describe_model,
    now,
    run_header,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PARTS = ("attention", "mlp", "lm_head")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], parents=[common_parser()]
    )
    p.add_argument("models", nargs="+", help="DENSE_DIR first, then candidates")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    return p.parse_args(argv)


class PartTimer:
    """Forward hooks that add up wall time per part of the model."""

    def __init__(self, model):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._start: dict[int, float] = {}
        self._handles = []
        modules = [("lm_head", model.get_output_embeddings())]
        for layer in model.model.layers:
            modules += [("attention", layer.self_attn), ("mlp", layer.mlp)]
        for part, module in modules:
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post(part)))

    def _pre(self, module, args):
        self._start[id(module)] = time.perf_counter()

    def _post(self, part):
        def hook(module, args, output):
            self.seconds[part] += time.perf_counter() - self._start.pop(id(module))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def decode(model, ids, new_tokens: int) -> float:
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )
        seconds = time.perf_counter() - t0
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise RuntimeError("generate did not produce the requested number of tokens")
    return seconds


def prefill(model, ids) -> float:
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        return time.perf_counter() - t0


def timed_parts(model, run) -> tuple[float, float, dict]:
    """(plain seconds, hooked seconds, seconds per part) of ``run()``."""
    plain = run()
    timer = PartTimer(model)
    try:
        hooked = run()
    finally:
        timer.remove()
    return plain, hooked, timer.seconds


def profile_round(model, ids, new_tokens: int, prefill_ids=None) -> dict:
    plain, hooked, seconds = timed_parts(model, lambda: decode(model, ids, new_tokens))
    per_token = {k: v / new_tokens * 1000 for k, v in seconds.items()}
    per_token["other"] = hooked / new_tokens * 1000 - sum(per_token.values())
    result = {
        "ms_per_token": plain / new_tokens * 1000,
        "hooked_ms_per_token": hooked / new_tokens * 1000,
        "parts_ms_per_token": per_token,
    }
    if prefill_ids is not None:
        plain, hooked, seconds = timed_parts(model, lambda: prefill(model, prefill_ids))
        parts = {k: v * 1000 for k, v in seconds.items()}
        parts["other"] = hooked * 1000 - sum(parts.values())
        result["prefill_ms"] = plain * 1000
        result["prefill_parts_ms"] = parts
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    import tomoe_modifier  # noqa: F401  (registers the ToMoE architectures)

    started = now()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    models = {
        p: AutoModelForCausalLM.from_pretrained(p, dtype=dtype).eval()
        for p in args.models
    }
    vocab = next(iter(models.values())).config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (1, args.prompt_tokens), generator=g)
    long_ids = None
    if args.prefill_tokens:
        long_ids = torch.randint(0, vocab, (1, args.prefill_tokens), generator=g)
    for model in models.values():
        decode(model, ids[:, :8], 4)  # warm-up
        if long_ids is not None:
            prefill(model, long_ids)
    rounds: dict[str, list[dict]] = {p: [] for p in models}
    paths = list(models)
    for r in range(args.rounds):
        for path in paths[r % len(paths) :] + paths[: r % len(paths)]:
            rounds[path].append(
                profile_round(models[path], ids, args.new_tokens, long_ids)
            )
    entries = []
    for path in paths:
        rs = rounds[path]
        parts = {
            k: statistics.median(x["parts_ms_per_token"][k] for x in rs)
            for k in (*PARTS, "other")
        }
        extra = {}
        if long_ids is not None:
            extra["prefill_ms"] = statistics.median(x["prefill_ms"] for x in rs)
            extra["prefill_parts_ms"] = {
                k: statistics.median(x["prefill_parts_ms"][k] for x in rs)
                for k in (*PARTS, "other")
            }
        entries.append(
            {
                **describe_model(path),
                **extra,
                "ms_per_token": statistics.median(x["ms_per_token"] for x in rs),
                "hooked_ms_per_token": statistics.median(
                    x["hooked_ms_per_token"] for x in rs
                ),
                "parts_ms_per_token": parts,
                "rounds": rs,
            }
        )
    result = {
        **run_header("profile_decode", started),
        "settings": {
            "dtype": args.dtype,
            "threads": args.threads,
            "rounds": args.rounds,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "prefill_tokens": args.prefill_tokens,
            "prompt": "seeded random ids",
        },
        "models": entries,
    }
    write_json(args.out, result)
    for e in entries:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in e["parts_ms_per_token"].items())
        print(f"{e['name']:<40} {e['ms_per_token']:.2f} ms/token ({parts})")


if __name__ == "__main__":
    main()
