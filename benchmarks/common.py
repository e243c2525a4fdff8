"""Helpers shared by the benchmark scripts: arguments, run headers, JSON files.

Not a script. It must not import ``tomoe_modifier`` at module level: the speed
benchmark's memory probe imports it and has to measure torch + transformers alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

__all__ = [
    "BENCH_META",
    "series",
    "tomoe_recipe",
    "common_parser",
    "describe_model",
    "folder_mib",
    "load_json",
    "now",
    "peak_rss_mib",
    "run_header",
    "write_json",
]

# Written last by benchmarks.sweep into each model folder: marks a finished run and says
# what the model is (method, target and achieved active ratio, calibration cost).
BENCH_META = "bench_meta.json"


def tomoe_recipe(path: str | Path, **fields) -> tuple[str, dict]:
    """A recipe file as YAML text with its ToMoE stage's ``fields`` overridden, and
    those ToMoE fields (the settings a result records)."""
    import yaml

    recipe = yaml.safe_load(Path(path).read_text())
    tomoe = recipe["tomoe_stage"]["tomoe_modifiers"]["ToMoEModifier"]
    tomoe.update(fields)
    return yaml.safe_dump(recipe, sort_keys=False), dict(tomoe)


def series(model: dict) -> str:
    """The name a model's row and curve carry: method, expert layout, runtime."""
    method = model.get("method")
    if method == "tomoe":
        layout = model.get("expert_layout") or "paper"
        if layout == "shared":
            variant = model.get("variant") or "stock"
            runtime = "CPU kernel" if variant == "cpu_kernels" else "stock transformers"
            return f"ToMoE shared ({runtime})"
        return "ToMoE paper"
    names = {
        "dense": "dense",
        "static": "static Wanda-sp",
        "flap": "static FLAP",
        "flap-uniform": "static FLAP (uniform widths)",
    }
    return names.get(method, str(method))


def common_parser() -> argparse.ArgumentParser:
    """The arguments every benchmark takes; use as ``parents=[common_parser()]``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p


def run_header(benchmark: str, started: str) -> dict:
    """What every result JSON starts with: name, times, command line, machine."""
    from tomoe_modifier.precision import machine_info

    return {
        "benchmark": benchmark,
        "started": started,
        "finished": now(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(),
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (``VmHWM``; ``ru_maxrss``
    survives ``exec`` and would report a parent's peak). The same reader as
    ``tomoe_modifier.stats.peak_rss_mib``, here so the probe needs no plugin."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def now() -> str:
    """Local date and time with offset, for the JSON files and the report."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` atomically (temp file + rename), so a kill leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
    os.replace(tmp, path)
    return path


def load_json(path: str | Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def folder_mib(path: str | Path) -> float:
    """Size on disk of the files of a model folder (what a user downloads)."""
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def describe_model(path: str | Path) -> dict:
    """Name, method and active ratio of a model folder (from the sweep's marker)."""
    path = Path(path)
    config = load_json(path / "config.json")
    meta_path = path / BENCH_META
    meta = load_json(meta_path) if meta_path.is_file() else {}
    model_type = config.get("model_type", "")
    converted = model_type.startswith("tomoe_") or model_type == "qwen2_moe"
    method = meta.get("method") or ("tomoe" if converted else "dense")
    layout = None
    if method == "tomoe":
        layout = "shared" if model_type == "qwen2_moe" else "paper"
    if method == "dense":
        target = achieved = 1.0
    else:
        target = meta.get("target_active_ratio")
        achieved = meta.get("active_ratio")
    return {
        "name": path.name,
        "path": str(path.resolve()),
        "method": method,
        "expert_layout": layout,
        "model_type": model_type,
        "target_active_ratio": target,
        "active_ratio": achieved,
        "intermediate_size": config.get("intermediate_size"),
        "moe_union_sizes": config.get("moe_union_sizes"),
        "num_experts": config.get("num_experts"),
        "folder_mib": round(folder_mib(path), 2),
    }
