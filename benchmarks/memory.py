"""
Peak memory of ToMoE's training modes on SmolLM2, each in a fresh process.

    python -m benchmarks.memory --mode global|layerwise|layerwise_then_global \\
        [--offload disk] [--ratio 0.5] [--iters 300] [--warm-start-tokens 16384] \\
        [--save DIR] --out outputs/memory/global.json

One ``oneshot`` run of the shipped recipe (``--recipe``, target ratio set to
``--ratio``) on the main example's calibration data, in this process: the peak
resident memory (``VmHWM``) after the imports and at the end, the wall time and
the settings. ``--offload disk`` loads the model with compressed-tensors' offloading
(``load_offloaded_model``, ``device_map="auto_offload"``) with no CPU memory to
spare, so every layer lives on disk and the sequential pipeline onloads one at a
time; it needs ``--mode layerwise``. Quality per mode comes from
``examples/smollm2_tomoe.py`` (global) and ``examples/smollm2_tomoe_layerwise.py``.
Run each mode in its own process: the peak of a process only grows. During
``oneshot`` a sampler keeps what the resident memory was made of at its peak
(anonymous pages, and file pages of the offload folder, the checkpoint and the
libraries), and at the peaks of the calibration and of the checkpoint save apart
(``at_peak_by_phase``: llm-compressor's save gathers every weight of an offloaded
model, so its peak is not ToMoE's). The JSON also
holds the prediction of ``benchmarks.memory_model`` for this run (on a CPU the
device is the host, so layer-wise counts both), to compare with the peak above the
imports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import memory_model
from benchmarks.common import (
    common_parser,
    now,
    peak_rss_mib,
    run_header,
    tomoe_recipe,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], parents=[common_parser()]
    )
    p.add_argument(
        "--mode",
        choices=("global", "layerwise", "layerwise_then_global"),
        required=True,
    )
    p.add_argument("--offload", choices=("none", "disk"), default="none")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--iters", type=int, default=None, help="override the recipe's")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "tomoe_50.yaml"))
    p.add_argument(
        "--warm-start-tokens",
        type=int,
        default=16384,
        help="tokens each layer's fit sees (layer-wise modes)",
    )
    p.add_argument("--save", help="keep the converted model in this folder")
    p.add_argument("--out", required=True, help="result JSON")
    args = p.parse_args(argv)
    if args.offload == "disk" and args.mode != "layerwise":
        p.error("--offload disk needs --mode layerwise (global holds the whole model)")
    return args


class RssBreakdown:
    """Samples this process's resident memory in a thread and keeps, at its peak,
    what it was made of: anonymous pages (tensors, caches) and file pages by
    mapping (``/proc/self/smaps``: the offload folder's safetensors, the source
    checkpoint, shared libraries). A peak the formula misses shows up here."""

    def __init__(
        self,
        groups: dict[str, str],
        interval_s: float = 0.25,
        packages: tuple[str, ...] = ("tomoe_modifier", "llmcompressor"),
    ):
        self.groups = groups  # label -> path prefix of the mapped files
        self.packages = packages  # whose calls ``running`` names
        self.interval_s = interval_s
        self._main = threading.get_ident()  # the thread running oneshot
        self._live: dict = {}  # the last live-tensor walk
        self._walk_at = self._walk_s = 0.0  # when it started, how long it took
        self.at_phase_peak: dict[str, dict] = {}  # "calibration" / "save"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _label(self, path: str) -> str:
        for label, prefix in self.groups.items():
            if path.startswith(prefix):
                return label
        return "other files (libraries)"

    def _phase(self, running: list[str]) -> str:
        """Phase "save" once oneshot writes the checkpoint (llm-compressor's
        post-process gathers every weight), "calibration" before: their peaks
        differ in kind."""
        saving = any("post_process" in c or "save_pretrained" in c for c in running)
        return "save" if saving else "calibration"

    def _sample(self):
        rss = _status_kib("VmRSS") / 1024
        running = self._running()
        phase = self._phase(running)
        # re-read smaps only on a new peak of this phase (the process's peak is
        # the highest phase peak)
        if rss < self.at_phase_peak.get(phase, {}).get("rss_mib", 0) + 8:
            return
        by_file: dict[str, float] = {}
        anon = 0.0
        path = ""
        try:
            with open("/proc/self/smaps") as f:
                for line in f:
                    head = line.split(maxsplit=5)
                    if "-" in head[0]:  # a mapping's header line
                        path = head[5].strip() if len(head) > 5 else ""
                    elif head[0] == "Rss:":
                        kib = int(head[1])
                        if not path or path.startswith("["):
                            anon += kib
                        else:
                            label = self._label(path)
                            by_file[label] = by_file.get(label, 0) + kib
        except OSError:
            return
        self.at_phase_peak[phase] = {
            "rss_mib": round(rss, 1),
            "t_s": round(time.perf_counter() - self._t0, 1),
            "running": running,
            **self._live_tensors(),
            "anonymous_mib": round(anon / 1024, 1),
            "file_mib": {k: round(v / 1024, 1) for k, v in sorted(by_file.items())},
        }

    @property
    def at_peak(self) -> dict:
        """The snapshot at the process's peak: the highest of the phases'."""
        peaks = self.at_phase_peak.values()
        return max(peaks, key=lambda a: a["rss_mib"], default={})

    def _running(self, depth: int = 6) -> list[str]:
        """The innermost calls of the oneshot thread in ``packages`` (this
        package and the toolkit; ``module:function:line``): where the peak was."""
        frame = sys._current_frames().get(self._main)
        calls = []
        while frame is not None and len(calls) < depth:
            module = frame.f_globals.get("__name__", "")
            if module.startswith(self.packages):
                calls.append(f"{module}:{frame.f_code.co_name}:{frame.f_lineno}")
            frame = frame.f_back
        return calls

    def _live_tensors(self, spacing: float = 10.0) -> dict:
        """Bytes of the distinct storages of all live tensors, and the largest
        ones' shapes: what the allocator holds for tensors at the peak, against
        which the resident anonymous memory shows what it keeps besides (freed
        blocks it has not returned). Walking the heap takes time (a fraction of a
        second during oneshot, milliseconds in a small process), so a new walk
        waits ``spacing`` times the last one's duration; ``live_t_s`` says when
        the one reported was taken."""
        t = time.perf_counter() - self._t0
        if self._live and t - self._walk_at < spacing * self._walk_s:
            return self._live
        import gc

        import torch

        storages: dict[int, tuple[int, str]] = {}
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = (
                        storage.nbytes(),
                        f"{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}",
                    )
            except Exception:  # tensors without storage (meta, sparse, freed)
                continue
        self._walk_at, self._walk_s = t, time.perf_counter() - self._t0 - t
        mib = memory_model.MIB
        largest = sorted(storages.values(), reverse=True)[:8]
        by_kind: dict[str, list[int]] = {}  # "shape dtype" -> [storages, bytes]
        for n, desc in storages.values():
            kind = by_kind.setdefault(desc, [0, 0])
            kind[0] += 1
            kind[1] += n
        groups = sorted(by_kind.items(), key=lambda item: -item[1][1])[:16]
        self._live = {
            "live_t_s": round(t, 1),
            "live_tensor_mib": round(sum(n for n, _ in storages.values()) / mib, 1),
            "largest_tensors": [f"{n / mib:.1f} MiB {desc}" for n, desc in largest],
            # many small tensors of one shape (cached batches) add up where no
            # single one is among the largest
            "live_by_shape": [
                f"{b / mib:.1f} MiB in {c} x {desc}" for desc, (c, b) in groups
            ],
        }
        return self._live


def _reset_peak_rss() -> None:
    """Start VmHWM again from the current resident size (Linux ``clear_refs`` 5):
    a first run converts the GGUF checkpoint, whose peak is not oneshot's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tomoe_modifier  # noqa: F401  (registers ToMoEModifier)
    from tomoe_modifier.assets import (
        build_calibration_dataset,
        load_split,
        prepare_smollm2,
    )

    torch.set_num_threads(args.threads)
    started = now()
    model_dir = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = build_calibration_dataset(
        tokenizer, load_split("wiki_train"), 128, seed=0
    )
    _reset_peak_rss()
    after_imports = peak_rss_mib()
    overrides = {"target_active_ratio": args.ratio, "train_mode": args.mode}
    if args.iters is not None:
        overrides["iters"] = args.iters
    if args.mode != "global":
        overrides["warm_start_tokens"] = args.warm_start_tokens
    recipe, tomoe = tomoe_recipe(args.recipe, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(model_dir)
        if args.offload == "disk":
            from compressed_tensors.offload import load_offloaded_model

            with load_offloaded_model():
                model = AutoModelForCausalLM.from_pretrained(
                    model_dir,
                    device_map="auto_offload",
                    max_memory={"cpu": 1},
                    offload_folder=str(Path(tmp) / "offload"),
                )
        groups = {
            "offload folder": str(Path(tmp) / "offload"),
            "checkpoint": str(model_dir),
        }
        t0 = time.perf_counter()
        with RssBreakdown(groups) as breakdown:
            oneshot(
                model=model,
                dataset=dataset,
                recipe=recipe,
                max_seq_length=128,
                num_calibration_samples=512,
                batch_size=4,
                output_dir=args.save or str(Path(tmp) / "out"),
            )
        wall = time.perf_counter() - t0
    config = json.loads((model_dir / "config.json").read_text())
    shapes = memory_model.Shapes.from_config("SmolLM2-135M", config)
    if args.mode != "layerwise":  # the end-to-end phase holds the whole model
        predicted = memory_model.global_bytes(shapes, tokens=4 * 128, weight_bytes=4)
    else:
        predicted = memory_model.layerwise_bytes(
            shapes, 4, 128, 512, args.warm_start_tokens, weight_bytes=4, act_bytes=4
        )
        predicted["total"] += predicted.pop("host")
    peak = peak_rss_mib()
    result = {
        **run_header("memory", started),
        "mode": args.mode,
        "offload": args.offload,
        "ratio": args.ratio,
        "recipe_fields": tomoe,
        "peak_rss_after_imports_mib": round(after_imports, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_above_imports_mib": round(peak - after_imports, 1),
        "predicted_mib": {
            k: round(v / memory_model.MIB, 1) for k, v in predicted.items()
        },
        "oneshot_wall_s": round(wall, 1),
        "at_peak_during_oneshot": breakdown.at_peak,
        # the same, for the calibration (training, layer fits) and the save apart
        "at_peak_by_phase": breakdown.at_phase_peak,
    }
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
