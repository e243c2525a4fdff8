"""Shared settings and evaluation for the SmolLM2 examples (not an example itself)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tomoe_modifier import ToMoEModifier
from tomoe_modifier.assets import (
    build_calibration_dataset,
    load_split,
    perplexity,
    prepare_smollm2,
    prepare_text,
)
from tomoe_modifier.precision import machine_info
from tomoe_modifier.stats import active_parameter_stats, peak_rss_mib

EVAL_CONTEXT = 512

__all__ = [
    "EVAL_CONTEXT",
    "add_tomoe_arguments",
    "calibration_set",
    "evaluate_dense_cached",
    "evaluate_folder",
    "peak_rss_mib",
    "tomoe_from_args",
]


def add_tomoe_arguments(parser: argparse.ArgumentParser) -> None:
    """The training budget both examples share (sized for a 2-core CPU)."""
    parser.add_argument("--ratio", type=float, default=0.5, help="target active ratio")
    parser.add_argument("--iters", type=int, default=800, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seq-len", type=int, default=128, help="training length")
    parser.add_argument("--batch-size", type=int, default=4)
    # Select number of samples. 512 samples is a good place to start. ToMoE cycles
    # the loader for --iters steps, and llm-compressor's sampler draws a fresh random
    # subset of this size on every pass, so training sees more than 512 samples.
    parser.add_argument("--num-calibration-samples", type=int, default=512)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--width-multiple", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="output folder")


def tomoe_from_args(args, report_path: Path) -> ToMoEModifier:
    return ToMoEModifier(
        target_active_ratio=args.ratio,
        num_experts=args.num_experts,
        width_multiple=args.width_multiple,
        iters=args.iters,
        lr=args.lr,
        seed=args.seed,
        log_every=20,
        report_path=str(report_path),
    )


def calibration_set(tokenizer, seq_len: int):
    """Wikipedia train articles packed into seq_len chunks (test articles unseen)."""
    prepare_text()
    return build_calibration_dataset(
        tokenizer, load_split("wiki_train"), seq_len, seed=0
    )


def smollm2():
    model_dir = prepare_smollm2()
    return model_dir, AutoTokenizer.from_pretrained(model_dir)


def _windows(tokenizer, texts, context):
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for i in range(0, len(ids), context):
            if len(ids[i : i + context]) >= 2:
                yield ids[i : i + context]


def evaluate_folder(
    folder: Path, tokenizer, dtype=torch.float32, stats_windows: int = 24
) -> dict:
    """Load with the standard API; test perplexity, active ratio, a sample reply."""
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    load_s = time.perf_counter() - t0
    test_texts = load_split("wiki_test")
    ppl = perplexity(model, tokenizer, test_texts, context=EVAL_CONTEXT)
    result = {
        "folder": str(folder),
        "ppl": ppl["perplexity"],
        "eval_tokens": ppl["tokens"],
        "load_s": round(load_s, 2),
    }
    if any(type(m).__name__ == "ToMoESparseMLP" for m in model.modules()):
        windows = list(_windows(tokenizer, test_texts, EVAL_CONTEXT))[:stats_windows]
        stats = active_parameter_stats(
            model, [{"input_ids": torch.tensor([w])} for w in windows]
        )
        result.update({k: v for k, v in stats.items()})
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    result["sample"] = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :])
    return result


def evaluate_dense_cached(model_dir: Path, tokenizer) -> dict:
    """The dense baseline never changes: evaluate it once per cache."""
    from tomoe_modifier.assets import cache_dir

    path = cache_dir() / "dense_eval_wiki_test_ctx512.json"
    if path.exists():
        return json.loads(path.read_text())
    result = evaluate_folder(model_dir, tokenizer)
    write_json(path, result)
    return result


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def machine() -> dict:
    return machine_info()
