"""
Peak memory of ToMoE's training modes on SmolLM2, each in a fresh process.

    python -m benchmarks.memory --mode global|layerwise|layerwise_then_global \\
        [--offload disk] [--ratio 0.5] [--iters 800] [--warm-start-tokens 16384] \\
        [--save DIR] --out outputs/memory/global.json

One ``oneshot`` run of the shipped recipe (``--recipe``, target ratio set to
``--ratio``) on the main example's calibration data, in this process: the peak
resident memory (``VmHWM``) after the imports and at the end, the wall time and
the settings. ``--offload disk`` loads the model with compressed-tensors' offloading
(``load_offloaded_model``, ``device_map="auto_offload"``) with no CPU memory to
spare, so every layer lives on disk and the sequential pipeline onloads one at a
time; it needs ``--mode layerwise``. Quality per mode comes from
``examples/smollm2_tomoe.py`` (global) and ``examples/smollm2_tomoe_layerwise.py``.
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
    p.add_argument(
        "--warm-start-tokens",
        type=int,
        default=16384,
        help="tokens each layer's fit sees (layer-wise modes)",
    )
    p.add_argument("--save", help="keep the converted model in this folder")
    p.add_argument("--out", required=True, help="result JSON")
    args = p.parse_args(argv)
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
        overrides["warm_start_tokens"] = args.warm_start_tokens
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
            output_dir=args.save or str(Path(tmp) / "out"),
        )
        wall = time.perf_counter() - t0
    config = json.loads((model_dir / "config.json").read_text())
    shapes = memory_model.Shapes.from_config("SmolLM2-135M", config)
    if args.mode != "layerwise":  # the end-to-end phase holds the whole model
        predicted = memory_model.global_bytes(shapes, tokens=4 * 128, weight_bytes=4)
    else:
        predicted = memory_model.layerwise_bytes(
            shapes, 4, 128, 512, args.warm_start_tokens, weight_bytes=4, act_bytes=4
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
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
