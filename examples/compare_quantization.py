"""
Table: dense bf16 vs W4A16 vs ToMoE p=0.5 vs ToMoE p=0.5 + W4A16 on SmolLM2-135M.

    python examples/smollm2_tomoe.py --ratio 0.5         # ToMoE alone (if not done)
    python examples/smollm2_tomoe_w4a16.py               # ToMoE + W4A16, one recipe
    python examples/compare_quantization.py              # builds the rest, measures

Same calibration data (512 x 128-token Wikipedia train chunks) and test data (held-out
Wikipedia articles and news, context 512) for every row. The W4A16 row uses the
quantization stage of ``recipes/tomoe_50_w4a16.yaml`` alone. Token perplexity is
computed with lm-eval in float32 from each checkpoint; load time and peak RSS are
measured in a fresh process per model (load in bfloat16 + one forward). Writes
examples/results/quantization.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import tomoe_modifier  # noqa: E402,F401
from tomoe_modifier.assets import (  # noqa: E402
    build_calibration_dataset,
    load_split,
    prepare_smollm2,
)
from tomoe_modifier.lm_eval_tasks import evaluate_perplexity  # noqa: E402
from tomoe_modifier.precision import machine_info  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tomoe_50_w4a16.yaml"
MAX_SEQUENCE_LENGTH = 128
NUM_CALIBRATION_SAMPLES = 512
EVAL_CONTEXT = 512
OUT = Path("outputs/quant")
LOAD_PROBE = """
import json, sys, time, torch
import tomoe_modifier
from tomoe_modifier.stats import peak_rss_mib
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
t0 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():
    m(torch.arange(16)[None] + 100)
print(json.dumps({"load_s": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}))
"""


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def probe_load(path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", LOAD_PROBE, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bf16_copy(src: Path, dst: Path, tokenizer) -> Path:
    if not (dst / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        model.save_pretrained(dst)
        tokenizer.save_pretrained(dst)
    return dst


def token_perplexities(folder: Path) -> dict:
    """Token perplexity per task (lm-eval, float32, context 512)."""
    out = evaluate_perplexity(
        folder, max_length=EVAL_CONTEXT, dtype="float32", device="cpu"
    )
    return {task: row["token_perplexity"] for task, row in out["results"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tomoe", default="outputs/SmolLM2-135M-Instruct-ToMoE-E8-p50")
    parser.add_argument(
        "--tomoe-w4a16",
        default="outputs/SmolLM2-135M-Instruct-ToMoE-E8-p50-W4A16-G64",
    )
    parser.add_argument(
        "--reuse-ppl",
        action="store_true",
        help="take perplexities from an earlier results file; re-measure the rest",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    for needed in (args.tomoe, args.tomoe_w4a16):
        if not (Path(needed) / "config.json").exists():
            raise SystemExit(
                f"{needed} is missing: run the examples listed above first"
            )

    model_dir = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense_bf16 = bf16_copy(model_dir, OUT / "SmolLM2-135M-Instruct-bf16", tokenizer)
    w4a16 = OUT / "SmolLM2-135M-Instruct-W4A16-G64"
    if not (w4a16 / "config.json").exists():
        quant_only = {"quant_stage": yaml.safe_load(RECIPE.read_text())["quant_stage"]}
        oneshot(
            model=str(model_dir),
            dataset=build_calibration_dataset(
                tokenizer, load_split("wiki_train"), MAX_SEQUENCE_LENGTH, seed=0
            ),
            recipe=yaml.safe_dump(quant_only),
            max_seq_length=MAX_SEQUENCE_LENGTH,
            num_calibration_samples=NUM_CALIBRATION_SAMPLES,
            batch_size=4,
            output_dir=str(w4a16),
        )
    tomoe_bf16 = bf16_copy(
        Path(args.tomoe), OUT / "SmolLM2-135M-Instruct-ToMoE-p50-bf16", tokenizer
    )
    rows = {
        "dense bf16": dense_bf16,
        "W4A16 (GPTQ, g64)": w4a16,
        "ToMoE p=0.5 (bf16)": tomoe_bf16,
        "ToMoE p=0.5 + W4A16": Path(args.tomoe_w4a16),
    }
    out = Path("examples/results/quantization.json")
    earlier = {}
    if args.reuse_ppl and out.is_file():
        earlier = {
            r["folder"]: {"tomoe_wiki_test": r["ppl"], "tomoe_news": r["news_ppl"]}
            for r in json.loads(out.read_text())["rows"]
            if "news_ppl" in r
        }
    results = []
    for name, path in rows.items():
        ppl = earlier.get(str(path)) or token_perplexities(path)
        load = probe_load(path)
        results.append(
            {
                "model": name,
                "folder": str(path),
                "ppl": ppl["tomoe_wiki_test"],
                "news_ppl": ppl["tomoe_news"],
                "folder_mib": round(folder_mib(path), 1),
                "peak_rss_at_load_mib": round(load["peak_rss_mib"], 1),
                "load_s": round(load["load_s"], 2),
            }
        )
        print(results[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"rows": results, "eval_dtype": "float32", "machine": machine_info()},
            indent=2,
        )
    )
    print(
        "\n| model | Wikipedia test ppl (fp32) | news ppl (fp32) | folder MiB | "
        "peak RSS at load MiB | load s |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['ppl']:.2f} | {r['news_ppl']:.2f} | "
            f"{r['folder_mib']:.0f} | "
            f"{r['peak_rss_at_load_mib']:.0f} | {r['load_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
