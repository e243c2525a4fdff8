"""
Seconds per end-to-end ToMoE training step on SmolLM2, float32 against bfloat16.

    python -m benchmarks.train_step [--steps 8] [--rounds 2] \\
        [--out benchmarks/results/train_step.json]

``compute_dtype: auto`` has to pick the faster of the two on the machine at hand,
and a CPU that has the bf16 instructions does not make bf16 faster by itself. Each
round runs ``oneshot`` with the shipped recipe (global mode, the activation start)
for ``--steps`` steps once per dtype, the dtypes alternating, on the main example's
calibration batches (4 x 128 tokens), and reads each step's time from the report's
history. A step is one teacher forward, one student forward and the backward pass.
Writes the median seconds per step of each dtype (the first step of a run, which
warms up, is left out) and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    common_parser,
    load_json,
    now,
    run_header,
    tomoe_recipe,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], parents=[common_parser()]
    )
    p.add_argument("--steps", type=int, default=8, help="training steps per run")
    p.add_argument("--rounds", type=int, default=2, help="runs per dtype")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--recipe", default=str(REPO / "recipes" / "tomoe_50.yaml"))
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    return p.parse_args(argv)


def step_seconds(model_dir, dataset, args, dtype: str) -> list[float]:
    """One oneshot run in ``dtype``: the seconds of its steps after the first."""
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        text, _ = tomoe_recipe(
            args.recipe,
            target_active_ratio=args.ratio,
            iters=args.steps,
            train_mode="global",
            warm_start="activation",
            compute_dtype=dtype,
            seed=args.seed,
            report_path=str(report),
        )
        active_session().reset()
        oneshot(
            model=str(model_dir),
            dataset=dataset,
            recipe=text,
            max_seq_length=128,
            num_calibration_samples=512,
            batch_size=4,
        )
        active_session().reset()
        elapsed = [r["elapsed_s"] for r in load_json(report)["history"]]
    return [b - a for a, b in zip(elapsed, elapsed[1:])]


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    import tomoe_modifier  # noqa: F401  (registers ToMoEModifier)
    from benchmarks.ablation import calibration
    from tomoe_modifier.assets import prepare_smollm2

    if args.steps < 2:
        raise SystemExit("--steps must be >= 2: the first step of a run is dropped")
    torch.set_num_threads(args.threads)
    started = now()
    model_dir = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset, _ = calibration(tokenizer, model_dir, "wiki")  # the ablation's rows
    steps: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    t0 = time.perf_counter()
    for round_ in range(args.rounds):
        for dtype in DTYPES if round_ % 2 == 0 else DTYPES[::-1]:
            steps[dtype] += step_seconds(model_dir, dataset, args, dtype)
            print(f"round {round_ + 1} {dtype}: {steps[dtype][-1]:.2f} s/step")
    median = {dtype: round(statistics.median(s), 3) for dtype, s in steps.items()}
    result = {
        **run_header("train_step", started),
        "steps_per_run": args.steps,
        "rounds": args.rounds,
        "tokens_per_step": 4 * 128,
        "median_step_s": median,
        "bfloat16_over_float32": round(median["bfloat16"] / median["float32"], 3),
        "step_s": {dtype: [round(x, 3) for x in s] for dtype, s in steps.items()},
        "auto_picks": str(tomoe_modifier.precision.choose_compute_dtype("cpu")),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_json(args.out, result)
    print(
        f"median s/step: float32 {median['float32']}, bfloat16 {median['bfloat16']} "
        f"(bf16 / fp32 = {result['bfloat16_over_float32']}); auto picks "
        f"{result['auto_picks']}"
    )


if __name__ == "__main__":
    main()
