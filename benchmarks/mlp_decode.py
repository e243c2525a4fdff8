"""
Batch-1 decode cost of the MLPs alone: dense, ToMoE's fast path and a static
narrower MLP, on SmolLM2-135M's shapes, weights cold in cache as in a real model.

    python -m benchmarks.mlp_decode [--dtype bfloat16] [--rounds 5] \\
        [--out outputs/mlp_decode-bfloat16.json]

A model's decode step runs every layer's MLP once per token, and the weights of
all layers (160 MiB in bf16 for SmolLM2's 30 MLPs) do not fit in the caches: each
layer reads its rows from memory. Timing one layer in a loop measures it with
cache-hot weights and flatters every path, so this runs ``--layers`` distinct
MLPs in sequence, like a model, and reports milliseconds per token for all of
them. The ToMoE experts get random channel subsets of ``--expert-fraction`` of
the channels (at p = 0.5 SmolLM2's trained experts hold about a third), the static
MLP that fraction of the channels, so the three read the bytes a real model
would. No weights are trained: this measures execution, not quality. The paths
are timed alternately, round by round, and the JSON records each round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from benchmarks.common import common_parser, now, run_header, write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], parents=[common_parser()]
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-fraction", type=float, default=1 / 3)
    p.add_argument("--tokens", type=int, default=200, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", required=True, help="result JSON")
    return p.parse_args(argv)


def llama_mlp(args, width: int) -> nn.Module:
    """transformers' Llama MLP of ``width`` channels: what the dense model runs."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=args.hidden, intermediate_size=width))


def tomoe_mlp(args, generator: torch.Generator):
    from tomoe_modifier.modeling_tomoe import ToMoESparseMLP

    moe = ToMoESparseMLP(args.hidden, args.intermediate, args.experts, 1)
    width = round(args.expert_fraction * args.intermediate)
    blocks = torch.zeros(args.experts, args.intermediate, dtype=torch.bool)
    for e in range(args.experts):
        chosen = torch.randperm(args.intermediate, generator=generator)[:width]
        blocks[e, chosen] = True
    moe.expert_blocks.copy_(blocks)
    return moe


def build(args) -> dict[str, list[nn.Module]]:
    generator = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    width = round(args.expert_fraction * args.intermediate)
    paths = {
        "dense": [llama_mlp(args, args.intermediate) for _ in range(args.layers)],
        "tomoe": [tomoe_mlp(args, generator) for _ in range(args.layers)],
        "static": [llama_mlp(args, width) for _ in range(args.layers)],
    }
    for modules in paths.values():
        for m in modules:
            for param in m.parameters():
                nn.init.normal_(param, 0.0, 0.02, generator=generator)
            m.to(dtype).eval().requires_grad_(False)
            if hasattr(m, "router"):
                m.router.float()  # as converted models keep it
    return paths


@torch.inference_mode()
def ms_per_token(modules: list[nn.Module], xs: torch.Tensor) -> float:
    start = time.perf_counter()
    for x in xs:
        h = x
        for m in modules:
            h = x + m(h)  # a residual stream, so every layer sees a new input
    return (time.perf_counter() - start) / len(xs) * 1e3


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = now()
    paths = build(args)
    dtype = getattr(torch, args.dtype)
    xs = torch.randn(args.tokens, 1, args.hidden).to(dtype)
    for modules in paths.values():  # warm-up: kernel build, expert tables
        ms_per_token(modules, xs[:4])
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: ms_per_token(m, xs) for name, m in paths.items()})
    median = {name: statistics.median(r[name] for r in rounds) for name in paths}
    result = {
        **run_header("mlp_decode", started),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "ms_per_token": median,
        "speedup_vs_dense": {n: median["dense"] / t for n, t in median.items()},
        "tomoe_vs_static": median["static"] / median["tomoe"],
        "rounds": rounds,
    }
    write_json(args.out, result)
    for name, t in median.items():
        print(f"{name:7s} {t:7.3f} ms/token  x{median['dense'] / t:.2f} vs dense")


if __name__ == "__main__":
    main()
