"""
Perplexity of model folders with the project's lm-eval tasks, context 512.

    python -m benchmarks.quality MODEL_DIR [MODEL_DIR ...] \\
        [--out-dir outputs/bench/results/quality] [--batch-size 4]

Runs ``tomoe_modifier.lm_eval_tasks.evaluate_perplexity`` (lm-eval
``loglikelihood_rolling`` over held-out Wikipedia articles, ``tomoe_wiki_test``,
and the Lee news corpus, ``tomoe_news``, in disjoint windows of ``--max-length``
512 tokens) on each folder, in float32 with ``--threads`` 2. One JSON per model,
``OUT_DIR/<folder name>.json``, with the model's method and active ratio (from
sweep.py's ``bench_meta.json``), the settings and the machine; a model whose JSON
exists with the same settings is skipped (``--force`` redoes). ``--limit`` N scores
only the first N articles per task, for smoke tests only.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from benchmarks.common import (
    common_parser,
    describe_model,
    load_json,
    now,
    run_header,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], parents=[common_parser()]
    )
    p.add_argument("models", nargs="+", help="model folders (dense one included)")
    p.add_argument("--out-dir", default="outputs/bench/results/quality")
    p.add_argument("--tasks", default="tomoe_wiki_test,tomoe_news")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--limit", type=float, default=None, help="smoke tests only")
    p.add_argument("--force", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    import tomoe_modifier  # noqa: F401  (registers the ToMoE architectures)
    from tomoe_modifier.lm_eval_tasks import evaluate_perplexity

    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    settings = {
        "tasks": tasks,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "threads": args.threads,
        "limit": limit,
    }
    for model_dir in args.models:
        if not (Path(model_dir) / "config.json").is_file():
            raise SystemExit(f"{model_dir} is not a model folder (no config.json)")
        out = Path(args.out_dir) / f"{Path(model_dir).resolve().name}.json"
        if out.is_file() and not args.force:
            previous = load_json(out)
            same = previous.get("settings", {}).get("requested") == settings
            if same and previous.get("model", {}).get("path") == str(
                Path(model_dir).resolve()
            ):
                print(f"skip {model_dir}: {out} exists (use --force to redo)")
                continue
        started = now()
        t0 = time.perf_counter()
        evaluated = evaluate_perplexity(
            model_dir,
            tasks,
            limit=limit,
            batch_size=args.batch_size,
            max_length=args.max_length,
            dtype=args.dtype,
            device="cpu",
        )
        seconds = time.perf_counter() - t0
        record = {
            **run_header("quality", started),
            "eval_seconds": round(seconds, 1),
            "model": describe_model(model_dir),
            "settings": {"requested": settings, **evaluated["settings"]},
            "results": evaluated["results"],
        }
        write_json(out, record)
        summary = ", ".join(
            f"{task} word ppl {row['word_perplexity']:.2f} "
            f"token ppl {row['token_perplexity']:.2f}"
            for task, row in evaluated["results"].items()
        )
        print(f"{Path(model_dir).name}: {summary} ({seconds:.0f}s) -> {out}")


if __name__ == "__main__":
    main()
