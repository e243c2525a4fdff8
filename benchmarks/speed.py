"""
Is the converted model faster than the dense one? Decode and prefill speed on CPU.

    python -m benchmarks.speed DENSE_DIR MODEL_DIR [MODEL_DIR ...] \\
        --out outputs/bench/results/speed.json [--rounds 3] [--dtype auto]

Every model is loaded once into this process, then the models are measured in
turns (dense, candidate 1, candidate 2, ..., rotating the start each round) for
``--rounds`` rounds, so slow drifts of the machine (other jobs, heat) hit all models
alike; the median per metric is reported with its ratio to dense. Per model and round:

- batch-1 greedy decode: ``--prompt-tokens`` (64) prompt, exactly ``--new-tokens``
  (128) new tokens (min_new_tokens = max_new_tokens, KV cache). ``decode_b1_tps``
  excludes the prompt's forward (time to first token, measured separately);
  ``decode_b1_e2e_tps`` is new tokens over the whole ``generate`` call.
- prefill: one forward of ``--prefill-tokens`` (512) tokens, ``use_cache=False``,
  with logits for every position (``prefill_tps``) and, as ``generate``'s prefill
  computes them, for the last one only (``prefill_last_tps``: the lm_head over 512
  positions is a fixed cost that neither method shrinks).
- batch-N greedy decode (``decode_bn_*``): as batch 1 with ``--batch`` (8) prompts
  of the same length, so no padding.

Then, per model, a fresh subprocess that imports only torch and transformers loads
it (``trust_remote_code=True``, as a user without this package would) and decodes
once, to measure load time and peak RSS (``VmHWM``). The folder size on disk is
recorded too. Prompts are the first tokens of held-out Wikipedia articles
(``--prompt-source text``) or seeded random ids (``random``, for tiny test models).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    common_parser,
    describe_model,
    now,
    peak_rss_mib,
    run_header,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_PROBE_PREFIX = "BENCH_PROBE "
METRICS = (
    "decode_b1_tps",
    "decode_b1_e2e_tps",
    "ttft_b1_s",
    "prefill_tps",
    "prefill_last_tps",
    "decode_bn_tps",
    "decode_bn_e2e_tps",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], parents=[common_parser()]
    )
    p.add_argument("models", nargs="*", help="DENSE_DIR first, then candidates")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="batch of the 2nd decode")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--prompt-source", choices=("text", "random"), default="text")
    p.add_argument(
        "--mode",
        choices=("eager", "compiled"),
        default="eager",
        help="compiled: decode with a static cache and torch.compile (prefill stays "
        "eager, as transformers does)",
    )
    p.add_argument(
        "--cpu-kernels",
        action="store_true",
        help="also time each stock Qwen2-MoE (shared layout) model through "
        "tomoe_modifier.use_cpu_kernels, as a second entry",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the RSS probes")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one model's RSS
    args = p.parse_args(argv)
    if args.probe is None:
        if len(args.models) < 2 or not args.out:
            p.error("give DENSE_DIR, at least one MODEL_DIR and --out FILE")
        if args.new_tokens < 2:
            p.error("--new-tokens must be >= 2 (decode speed excludes the first)")
    return args


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        from tomoe_modifier.precision import choose_compute_dtype

        return choose_compute_dtype("cpu")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# -- memory probe (runs in a fresh subprocess) -------------------------------------


def probe(args) -> None:
    """Load one model with torch+transformers only, decode once, print RSS/time."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    rss_imports = peak_rss_mib()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.probe, dtype=dtype, trust_remote_code=True
    ).eval()
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mib()
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(
        0, model.config.vocab_size, (1, args.prompt_tokens), generator=g
    )
    config = _generation_config(GenerationConfig, args.new_tokens, model.config)
    with torch.inference_mode():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
    result = {
        "load_s": round(load_s, 3),
        "rss_after_imports_mib": round(rss_imports, 1),
        "rss_after_load_mib": round(rss_loaded, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    print(_PROBE_PREFIX + json.dumps(result), flush=True)


def run_probe(path: str, args, dtype_name: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.speed",
        "--probe",
        path,
        "--dtype",
        dtype_name,
        "--threads",
        str(args.threads),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--new-tokens",
        str(args.new_tokens),
        "--seed",
        str(args.seed),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_PROBE_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory probe of {path} failed (exit {proc.returncode}); run it alone "
            f"to see why:\n  {' '.join(cmd)}\n{proc.stderr[-2000:]}"
        )
    return json.loads(lines[-1][len(_PROBE_PREFIX) :])


# -- timing ------------------------------------------------------------------------


def _generation_config(cls, new_tokens: int, model_config, compiled: bool = False):
    pad = model_config.pad_token_id
    eos = model_config.eos_token_id
    extra = {}
    if compiled:
        from transformers import CompileConfig

        compile_config = CompileConfig(fullgraph=True, mode="default", dynamic=False)
        # transformers compiles generate only on GPU-like devices unless asked
        compile_config._compile_all_devices = True
        extra = {"cache_implementation": "static", "compile_config": compile_config}
    return cls(
        do_sample=False,
        num_beams=1,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        use_cache=True,
        pad_token_id=pad if pad is not None else eos,
        eos_token_id=eos,
        **extra,
    )


def build_prompts(args, tokenizer, vocab_size: int) -> dict:
    """Batch-1/batch-N prompts and the prefill sequence, the same for every model."""
    import torch

    need_b = (args.batch, args.prompt_tokens)
    if args.prompt_source == "random":
        g = torch.Generator().manual_seed(args.seed)
        batch = torch.randint(0, vocab_size, need_b, generator=g)
        prefill = torch.randint(0, vocab_size, (1, args.prefill_tokens), generator=g)
        return {"b1": batch[:1], "bn": batch, "prefill": prefill}
    from tomoe_modifier.assets import load_split

    texts = load_split("wiki_test") + load_split("wiki_validation")
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    rows = [ids[: args.prompt_tokens] for ids in encoded]
    rows = [r for r in rows if len(r) == args.prompt_tokens][: args.batch]
    stream = [t for ids in encoded for t in ids][: args.prefill_tokens]
    if len(rows) < args.batch or len(stream) < args.prefill_tokens:
        raise ValueError(
            "not enough held-out text for the prompts; lower --batch, "
            "--prompt-tokens or --prefill-tokens, or use --prompt-source random"
        )
    batch = torch.tensor(rows)
    return {"b1": batch[:1], "bn": batch, "prefill": torch.tensor([stream])}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(model, prompts: dict, new_tokens: int, compiled: bool = False) -> dict:
    """One round of every metric on one model (inference mode, greedy)."""
    import torch
    from transformers import GenerationConfig

    full = _generation_config(GenerationConfig, new_tokens, model.config, compiled)
    first = _generation_config(GenerationConfig, 1, model.config, compiled)
    out: dict[str, float] = {}
    with torch.inference_mode():
        for tag, ids in (("b1", prompts["b1"]), ("bn", prompts["bn"])):
            mask = torch.ones_like(ids)
            ttft = _timed(
                lambda: model.generate(
                    ids, attention_mask=mask, generation_config=first
                )
            )
            result = {}

            def run():
                result["ids"] = model.generate(
                    ids, attention_mask=mask, generation_config=full
                )

            total = _timed(run)
            produced = result["ids"].shape[1] - ids.shape[1]
            if produced != new_tokens:
                raise RuntimeError(
                    f"generate produced {produced} tokens instead of {new_tokens}; "
                    "min_new_tokens was not honoured"
                )
            rows = ids.shape[0]
            out[f"decode_{tag}_tps"] = rows * (new_tokens - 1) / (total - ttft)
            out[f"decode_{tag}_e2e_tps"] = rows * new_tokens / total
            if tag == "b1":
                out["ttft_b1_s"] = ttft
        ids = prompts["prefill"]
        seconds = _timed(lambda: model(input_ids=ids, use_cache=False))
        out["prefill_tps"] = ids.shape[1] / seconds
        seconds = _timed(
            lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)
        )
        out["prefill_last_tps"] = ids.shape[1] / seconds
    return out


def warm_up(model, prompts: dict, new_tokens: int, compiled: bool = False) -> None:
    """Untimed runs: first-call allocations, kernel selection and, compiled, the
    compilation of every shape the timed rounds use. Compiled, that is a whole
    round with the timed number of new tokens: the static cache is sized by it, and
    a shorter warm-up left the recompilation inside the first timed round (about
    4 tok/s instead of 20 on SmolLM2)."""
    if compiled:
        measure(model, prompts, new_tokens, compiled=True)
        return
    short = {k: v[:, : min(v.shape[1], 16)] for k, v in prompts.items()}
    measure(model, short, 4)


def load_entries(paths: list[str], dtype, cpu_kernels: bool) -> list[dict]:
    """One entry per model to time: each folder, plus (``cpu_kernels``) each stock
    Qwen2-MoE folder again through ``use_cpu_kernels``."""
    from transformers import AutoModelForCausalLM

    from tomoe_modifier import use_cpu_kernels

    entries = []
    for path in paths:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        load_s = time.perf_counter() - t0
        entries.append({"path": path, "variant": "", "model": model, "load_s": load_s})
        if cpu_kernels and model.config.model_type == "qwen2_moe":
            fast = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            entries.append(
                {
                    "path": path,
                    "variant": "cpu_kernels",
                    "model": use_cpu_kernels(fast),
                    "load_s": load_s,
                }
            )
    return entries


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.probe is not None:
        probe(args)
        return

    import torch
    from transformers import AutoTokenizer

    import tomoe_modifier  # noqa: F401  (registers the ToMoE architectures)

    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    paths = [str(Path(m)) for m in args.models]
    for path in paths:
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"{path} is not a model folder (no config.json)")
    started = now()
    load_start = os.getloadavg()
    if load_start[0] > 0.5:
        print(
            f"warning: 1-minute load average is {load_start[0]:.1f}; other jobs on "
            "this machine will distort the timings (recorded in the JSON)",
            flush=True,
        )

    memory = {}
    if not args.no_memory:
        for path in paths:
            memory[path] = run_probe(path, args, dtype_name)
            print(f"memory {Path(path).name}: {memory[path]}", flush=True)

    entries = load_entries(paths, dtype, args.cpu_kernels)
    compiled = args.mode == "compiled"
    if compiled:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = 64  # a graph per model and shape
    tokenizer = AutoTokenizer.from_pretrained(paths[0])
    prompts = build_prompts(args, tokenizer, entries[0]["model"].config.vocab_size)
    for entry in entries:
        t0 = time.perf_counter()
        warm_up(entry["model"], prompts, args.new_tokens, compiled)
        entry["warm_up_s"] = round(time.perf_counter() - t0, 1)
        entry["rounds"] = []

    metrics = (
        METRICS
        if not compiled
        else tuple(m for m in METRICS if not m.startswith("prefill"))
    )
    for r in range(args.rounds):
        order = entries[r % len(entries) :] + entries[: r % len(entries)]
        for entry in order:
            result = measure(entry["model"], prompts, args.new_tokens, compiled)
            entry["rounds"].append(result)
            summary = ", ".join(f"{k}={v:.2f}" for k, v in result.items())
            label = Path(entry["path"]).name + (
                f"+{entry['variant']}" * bool(entry["variant"])
            )
            print(f"round {r + 1}/{args.rounds} {label}: {summary}")

    for entry in entries:
        entry["median"] = {
            m: statistics.median(x[m] for x in entry["rounds"]) for m in metrics
        }
    dense = entries[0]
    results = []
    for entry in entries:
        ratio = {
            m: entry["median"][m] / dense["median"][m]
            for m in metrics
            if m != "ttft_b1_s"
        }
        described = describe_model(entry["path"])
        if entry["variant"]:
            described["name"] += f"+{entry['variant']}"
        results.append(
            {
                **described,
                "variant": entry["variant"] or "stock",
                "role": "dense" if entry is dense else "candidate",
                "load_s_in_process": round(entry["load_s"], 3),
                "warm_up_s": entry["warm_up_s"],
                "memory": None if entry["variant"] else memory.get(entry["path"]),
                "median": entry["median"],
                "speedup_vs_dense": ratio,
                "rounds": entry["rounds"],
            }
        )
    settings = {
        "rounds": args.rounds,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "prefill_tokens": args.prefill_tokens,
        "batch": args.batch,
        "dtype_arg": args.dtype,
        "dtype": dtype_name,
        "threads": args.threads,
        "prompt_source": args.prompt_source,
        "seed": args.seed,
        "mode": args.mode,
        "decoding": "greedy, KV cache, min_new_tokens = max_new_tokens"
        + (
            "; static cache, torch.compile(fullgraph, mode default) of the decode "
            "step, prefill eager"
            if compiled
            else ""
        ),
        "order": "models alternate within each round, start rotated per round",
        "memory_probe": "fresh process, torch+transformers only, "
        "trust_remote_code=True, load + one batch-1 decode",
    }
    result = {
        **run_header("speed", started),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "settings": settings,
        "models": results,
    }
    write_json(args.out, result)
    print(f"\nwrote {args.out}")
    for e in results:
        s = e["speedup_vs_dense"]
        prefill = f"prefill x{s['prefill_tps']:.2f}  " if "prefill_tps" in s else ""
        print(
            f"  {e['name']:<40} decode b1 {e['median']['decode_b1_tps']:7.1f} tok/s "
            f"(x{s['decode_b1_tps']:.2f})  {prefill}"
            f"decode b{args.batch} x{s['decode_bn_tps']:.2f}"
        )


if __name__ == "__main__":
    main()
