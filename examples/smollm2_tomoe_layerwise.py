"""
ToMoE one decoder layer at a time (llm-compressor's sequential pipeline), alone or
data-parallel under torchrun: the pattern for models that do not fit one device.

    python examples/smollm2_tomoe_layerwise.py                       # p = 0.5
    python examples/smollm2_tomoe_layerwise.py --mode layerwise_then_global
    python examples/smollm2_tomoe_layerwise.py --offload disk        # weights on disk
    torchrun --nproc-per-node 2 examples/smollm2_tomoe_layerwise.py  # 2 processes

The shipped recipe ``recipes/tomoe_50.yaml`` with ``train_mode`` (and the target
ratio) overridden. ``layerwise`` fits each layer's router and expert masks on that
layer's captured inputs while the pipeline holds only that layer on the execution
device; ``layerwise_then_global`` adds the end-to-end phase (the recipe's 300 steps),
which needs the whole model on the device. The model is loaded the way llm-compressor
loads big models, ``load_offloaded_model`` with ``device_map="auto_offload"``
(``--offload disk`` leaves no CPU memory for weights, so every layer lives on disk).
Under torchrun each rank calibrates on its share of the data and rank 0 saves and
evaluates. Writes ``examples/results/smollm2_<mode>_p<NN>.json`` with the same
fields as ``smollm2_tomoe.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402
from compressed_tensors.offload import load_offloaded_model  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import tomoe_modifier  # noqa: E402,F401  (registers ToMoEModifier + architectures)
from tomoe_modifier.assets import (  # noqa: E402
    build_calibration_dataset,
    load_split,
    prepare_smollm2,
)
from tomoe_modifier.lm_eval_tasks import evaluate_perplexity  # noqa: E402
from tomoe_modifier.precision import machine_info  # noqa: E402
from tomoe_modifier.stats import active_ratio_on_text, peak_rss_mib  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent
RECIPE = EXAMPLES.parent / "recipes" / "tomoe_50.yaml"
MAX_SEQUENCE_LENGTH = 128
BATCH_SIZE = 4
NUM_CALIBRATION_SAMPLES = 512
WARM_START_TOKENS = 16384  # tokens each layer's fit sees
EVAL_TASKS = ("tomoe_wiki_test", "tomoe_news")
EVAL_CONTEXT = 512
THREADS = 2


def init_distributed() -> int:
    """Join the torchrun group (NCCL on GPUs through compressed-tensors' helper,
    gloo on CPUs); the world size, 1 when not under torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return 1
    if torch.accelerator.current_accelerator() is not None:
        from compressed_tensors.offload import init_dist

        init_dist()
    else:
        dist.init_process_group("gloo")
    return dist.get_world_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5, help="target active ratio")
    parser.add_argument(
        "--mode", choices=("layerwise", "layerwise_then_global"), default="layerwise"
    )
    parser.add_argument("--offload", choices=("cpu", "disk"), default="cpu")
    parser.add_argument("--output", default=None, help="output folder")
    args = parser.parse_args()
    world_size = init_distributed()
    rank = dist.get_rank() if world_size > 1 else 0
    torch.set_num_threads(max(1, THREADS // world_size))
    tag = f"p{int(round(args.ratio * 100))}"

    # Select model and load it, offloaded: the pipeline onloads one layer at a time.
    model_dir = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    save_dir = Path(
        args.output or f"outputs/SmolLM2-135M-Instruct-ToMoE-{args.mode}-{tag}"
    )
    offload_dir = tempfile.TemporaryDirectory()
    disk = {"max_memory": {"cpu": 1}, "offload_folder": offload_dir.name}
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            device_map="auto_offload",
            **(disk if args.offload == "disk" else {}),
        )

    # Select calibration dataset: Wikipedia train articles packed into windows.
    dataset = build_calibration_dataset(
        tokenizer, load_split("wiki_train"), MAX_SEQUENCE_LENGTH, seed=0
    )

    # Apply algorithms: the shipped recipe in a layer-wise train mode.
    recipe = yaml.safe_load(RECIPE.read_text())
    tomoe = recipe["tomoe_stage"]["tomoe_modifiers"]["ToMoEModifier"]
    tomoe.update(
        target_active_ratio=args.ratio,
        train_mode=args.mode,
        warm_start_tokens=WARM_START_TOKENS,
    )
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=yaml.safe_dump(recipe, sort_keys=False),
        max_seq_length=MAX_SEQUENCE_LENGTH,
        num_calibration_samples=NUM_CALIBRATION_SAMPLES,
        batch_size=BATCH_SIZE,
        output_dir=str(save_dir),
    )
    calibration_s = time.perf_counter() - t0
    peak_rss = peak_rss_mib()
    offload_dir.cleanup()
    if world_size > 1:
        dist.barrier()  # rank 0 has saved
    if rank != 0:
        dist.destroy_process_group()
        return

    # Confirm the converted model loads with the standard API and looks sane.
    ppl = evaluate_perplexity(
        save_dir, EVAL_TASKS, max_length=EVAL_CONTEXT, dtype="float32", device="cpu"
    )["results"]
    converted = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32)
    active = active_ratio_on_text(
        converted, tokenizer, load_split("wiki_test"), EVAL_CONTEXT
    )
    results = {
        "model": "SmolLM2-135M-Instruct",
        "recipe": str(RECIPE.relative_to(EXAMPLES.parent)),
        "train_mode": args.mode,
        "offload": args.offload,
        "world_size": world_size,
        "target_active_ratio": args.ratio,
        "settings": {"tomoe": tomoe, "threads_per_rank": torch.get_num_threads()},
        "tomoe_ppl": ppl["tomoe_wiki_test"]["token_perplexity"],
        "tomoe_news_ppl": ppl["tomoe_news"]["token_perplexity"],
        "active_ratio_mean": active["active_ratio_mean"],
        "active_ratio_worst_case": active["active_ratio_worst_case"],
        "calibration_wall_s": round(calibration_s, 1),
        "peak_rss_mib": round(peak_rss, 1),
        "machine": machine_info(),
    }
    out = EXAMPLES / "results" / f"smollm2_{args.mode}_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in list(results)[:6]}, indent=2))
    for key in (
        "tomoe_ppl",
        "tomoe_news_ppl",
        "active_ratio_mean",
        "calibration_wall_s",
    ):
        print(f"  {key}: {results[key]}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
