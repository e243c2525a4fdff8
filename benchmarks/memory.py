"""
Peak memory of ToMoE's training modes on SmolLM2, each in a fresh process.

    python -m benchmarks.memory --mode global|layerwise|layerwise_then_global \\
        [--offload disk] [--ratio 0.5] [--iters 800] [--output DIR [--evaluate]] \\
        --out outputs/memory/global.json

One ``oneshot`` run of the shipped recipe (``--recipe``, target ratio set to
``--ratio``) on the main example's calibration data, in this process: the peak
resident memory (``VmHWM``) after the imports and at the end, the wall time and
the settings. ``--offload disk`` loads the model with compressed-tensors' offloading
(``load_offloaded_model``, ``device_map="auto_offload"``) with no CPU memory to
spare, so every layer lives on disk and the sequential pipeline onloads one at a
time; it needs ``--mode layerwise``. ``--output`` keeps the converted model and
``--evaluate`` then adds its Wikipedia test and news token perplexity (lm-eval,
float32, context 512, as the main example), measured after the peak is read.
Run each mode in its own process: the peak of a process only grows. The JSON also
holds the prediction of ``benchmarks.memory_model`` for this run (on a CPU the
device is the host, so layer-wise counts both), to compare with the peak above the
imports.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks import memory_model
from benchmarks.common import (
    common_parser,
    now,
    peak_rss_mib,
    run_header,
    tomoe_recipe,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], parents=[common_parser()]
    )
    p.add_argument(
        "--mode",
        choices=("global", "layerwise", "layerwise_then_global"),
        required=True,
    )
    p.add_argument("--offload", choices=("none", "disk"), default="none")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--iters", type=int, default=None, help="override the recipe's")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "tomoe_50.yaml"))
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--output", default=None, help="keep the converted model here")
    p.add_argument("--evaluate", action="store_true", help="needs --output")
    args = p.parse_args(argv)
    if args.evaluate and args.output is None:
        p.error("--evaluate needs --output (the model folder to evaluate)")
    if args.offload == "disk" and args.mode != "layerwise":
        p.error("--offload disk needs --mode layerwise (global holds the whole model)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tomoe_modifier  # noqa: F401  (registers ToMoEModifier)
    from tomoe_modifier.assets import (
        build_calibration_dataset,
        load_split,
        prepare_smollm2,
    )

    torch.set_num_threads(args.threads)
    started = now()
    model_dir = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = build_calibration_dataset(
        tokenizer, load_split("wiki_train"), 128, seed=0
    )
    after_imports = peak_rss_mib()
    overrides = {"target_active_ratio": args.ratio, "train_mode": args.mode}
    if args.iters is not None:
        overrides["iters"] = args.iters
    if args.mode != "global":
        overrides["warm_start_tokens"] = 16384
    recipe, tomoe = tomoe_recipe(args.recipe, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(model_dir)
        if args.offload == "disk":
            from compressed_tensors.offload import load_offloaded_model

            with load_offloaded_model():
                model = AutoModelForCausalLM.from_pretrained(
                    model_dir,
                    device_map="auto_offload",
                    max_memory={"cpu": 1},
                    offload_folder=str(Path(tmp) / "offload"),
                )
        t0 = time.perf_counter()
        oneshot(
            model=model,
            dataset=dataset,
            recipe=recipe,
            max_seq_length=128,
            num_calibration_samples=512,
            batch_size=4,
            output_dir=args.output or str(Path(tmp) / "out"),
        )
        wall = time.perf_counter() - t0
    config = json.loads((model_dir / "config.json").read_text())
    shapes = memory_model.Shapes.from_config("SmolLM2-135M", config)
    if args.mode != "layerwise":  # the end-to-end phase holds the whole model
        predicted = memory_model.global_bytes(shapes, tokens=4 * 128, weight_bytes=4)
    else:
        predicted = memory_model.layerwise_bytes(
            shapes, 4, 128, 512, 16384, weight_bytes=4, act_bytes=4
        )
        predicted["total"] += predicted.pop("host")
    peak = peak_rss_mib()
    result = {
        **run_header("memory", started),
        "mode": args.mode,
        "offload": args.offload,
        "ratio": args.ratio,
        "recipe_fields": tomoe,
        "peak_rss_after_imports_mib": round(after_imports, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_above_imports_mib": round(peak - after_imports, 1),
        "predicted_mib": {
            k: round(v / memory_model.MIB, 1) for k, v in predicted.items()
        },
        "oneshot_wall_s": round(wall, 1),
    }
    if args.evaluate:
        from tomoe_modifier.lm_eval_tasks import evaluate_perplexity

        out = evaluate_perplexity(
            args.output,
            ("tomoe_wiki_test", "tomoe_news"),
            max_length=512,
            dtype="float32",
            device="cpu",
        )["results"]
        result["tomoe_ppl"] = out["tomoe_wiki_test"]["token_perplexity"]
        result["tomoe_news_ppl"] = out["tomoe_news"]["token_perplexity"]
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
