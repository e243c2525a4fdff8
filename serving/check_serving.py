"""
Serve an exported checkpoint with vLLM and check it against transformers.

    bash serving/install.sh                                     # once
    python serving/check_serving.py EXPORT_DIR --dense DENSE_DIR \\
        [--dtype bfloat16] [--out serving/results/smollm2-shared-p50.json]

Greedy continuations of 3 prompts x 32 tokens come from transformers (this
environment, the one llm-compressor exports with) and from vLLM's offline
``LLM.generate`` (``serving/.venv``, run as a subprocess by ``vllm_generate.py``);
they must be identical. vLLM's batch-1 decode tokens/s of the export and of the
dense model are measured in the same vLLM process, alternating. End of sequence
never stops either side, so both continue the same argmax path. Exits 1 on a
mismatch or when vLLM cannot load the export.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
SERVING_PYTHON = HERE / ".venv" / "bin" / "python"
QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
)


def prompt_ids(folder: Path, count: int = 3, seed: int = 0) -> list[list[int]]:
    """Chat-formatted questions when the tokenizer has a chat template, else
    seeded random ids (tiny test models)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if getattr(tokenizer, "chat_template", None):
        return [  # transformers 5 returns a BatchEncoding here
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}],
                    add_generation_prompt=True,
                    return_dict=True,
                )["input_ids"]
            )
            for q in QUESTIONS[:count]
        ]
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    return torch.randint(4, vocab, (count, 8), generator=g).tolist()


def transformers_greedy(folder: Path, prompts, max_tokens: int, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = None  # never stop early, as vLLM here
    tokens = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            tokens.append(out[0, len(ids) :].tolist())
    return tokens


def run_vllm(request: dict, python: Path = SERVING_PYTHON) -> dict:
    if not python.is_file():
        raise SystemExit(
            f"{python} is missing: create the serving environment with "
            "`bash serving/install.sh` first"
        )
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "out.json"
        req.write_text(json.dumps(request))
        proc = subprocess.run(
            [str(python), str(HERE / "vllm_generate.py"), str(req), str(out)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"vLLM run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("export", help="exported checkpoint (e.g. the shared layout)")
    p.add_argument("--dense", required=True, help="the dense model it came from")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--speed-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    export, dense = Path(args.export).resolve(), Path(args.dense).resolve()
    prompts = prompt_ids(export)
    reference = transformers_greedy(export, prompts, args.max_tokens, args.dtype)
    served = run_vllm(
        {
            "models": [str(export), str(dense)],
            "dtype": args.dtype,
            "prompt_token_ids": prompts,
            "max_tokens": args.max_tokens,
            "speed_tokens": args.speed_tokens,
            "rounds": args.rounds,
        }
    )
    export_run = served["models"][str(export)]
    dense_run = served["models"][str(dense)]
    result = {
        "export": str(export),
        "dense": str(dense),
        "dtype": args.dtype,
        "vllm": served["vllm"],
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "transformers_tokens": reference,
        "export_run": export_run,
        "dense_run": dense_run,
    }
    ok = "error" not in export_run
    if ok:
        matches = [a == b for a, b in zip(reference, export_run["tokens"])]
        result["greedy_match"] = matches
        ok = all(matches)
        if "decode_tps" in dense_run:
            result["decode_speedup_vs_dense"] = (
                export_run["decode_tps"] / dense_run["decode_tps"]
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if "error" in export_run:
        print(f"vLLM could not load {export}: {export_run['error']}")
    else:
        print(f"greedy tokens match transformers: {result['greedy_match']}")
        print(
            f"vLLM decode tok/s: export {export_run['decode_tps']:.1f}, dense "
            f"{dense_run.get('decode_tps', float('nan')):.1f} "
            f"(x{result.get('decode_speedup_vs_dense', float('nan')):.2f})"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
