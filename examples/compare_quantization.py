"""
Table: dense bf16 vs W4A16 vs ToMoE p=0.5 vs ToMoE p=0.5 + W4A16 on SmolLM2-135M.

    python examples/smollm2_tomoe.py --ratio 0.5         # ToMoE alone (if not done)
    python examples/smollm2_tomoe_w4a16.py               # ToMoE + W4A16, one recipe
    python examples/compare_quantization.py              # builds the rest, measures

Same calibration data (512 x 128-token Wikipedia train chunks) and test data (held-out
Wikipedia articles, context 512) for every row. Perplexity is computed in float32 from
each checkpoint; load time and peak RSS are measured in a fresh process per model
(load in bfloat16 + one forward). Writes examples/results/quantization.json and
prints a Markdown table.
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
from llmcompressor import oneshot  # noqa: E402
from smollm2_common import calibration_set, evaluate_folder, machine, smollm2  # noqa: E402
from smollm2_tomoe_w4a16 import w4a16_gptq  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import tomoe_modifier  # noqa: E402,F401

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


def bf16_copy(src: Path, dst: Path) -> Path:
    if not (dst / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        model.save_pretrained(dst)
        smollm2()[1].save_pretrained(dst)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tomoe", default="outputs/SmolLM2-135M-Instruct-ToMoE-E8-p50")
    parser.add_argument(
        "--tomoe-w4a16",
        default="outputs/SmolLM2-135M-Instruct-ToMoE-E8-p50-W4A16-G64",
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--num-calibration-samples", type=int, default=512)
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

    model_dir, tokenizer = smollm2()
    dense_bf16 = bf16_copy(model_dir, OUT / "SmolLM2-135M-Instruct-bf16")
    w4a16 = OUT / "SmolLM2-135M-Instruct-W4A16-G64"
    if not (w4a16 / "config.json").exists():
        oneshot(
            model=str(model_dir),
            dataset=calibration_set(tokenizer, args.seq_len),
            recipe=[w4a16_gptq()],
            max_seq_length=args.seq_len,
            num_calibration_samples=args.num_calibration_samples,
            batch_size=4,
            output_dir=str(w4a16),
        )
    tomoe_bf16 = bf16_copy(
        Path(args.tomoe), OUT / "SmolLM2-135M-Instruct-ToMoE-p50-bf16"
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
        earlier = {r["folder"]: r["ppl"] for r in json.loads(out.read_text())["rows"]}
    results = []
    for name, path in rows.items():
        if str(path) in earlier:
            quality = {"ppl": earlier[str(path)]}
        else:
            quality = evaluate_folder(path, tokenizer)
        load = probe_load(path)
        results.append(
            {
                "model": name,
                "folder": str(path),
                "ppl": quality["ppl"],
                "folder_mib": round(folder_mib(path), 1),
                "peak_rss_at_load_mib": round(load["peak_rss_mib"], 1),
                "load_s": round(load["load_s"], 2),
            }
        )
        print(results[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": results, "machine": machine()}, indent=2))
    print("\n| model | test ppl | folder MiB | peak RSS at load MiB | load s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['ppl']:.2f} | {r['folder_mib']:.0f} | "
            f"{r['peak_rss_at_load_mib']:.0f} | {r['load_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
