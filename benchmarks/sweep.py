"""
ToMoE and a static pruned baseline at several budgets, on the same calibration data.

    python -m benchmarks.sweep [--ratios 0.7 0.6 0.5 0.4] [--out-root outputs/bench]

For each target active ratio p (attention+MLP parameters per token over dense):

- ToMoE through llm-compressor's ``oneshot`` with the shipped recipe
  (``--recipe``, default ``recipes/tomoe_50.yaml``) whose target ratio alone is set
  to p, on Wikipedia train articles packed into ``--seq-len`` 128-token chunks,
  batch ``--batch-size`` 4, ``--num-calibration-samples`` 512 per pass (the
  settings of ``examples/smollm2_tomoe.py``) -> ``OUT/models/tomoe-pNN``. Its
  active ratio is then measured on ``--stats-windows`` held-out validation windows
  of 512 tokens.
- ToMoE in the shared layout (``--methods shared``), the same with
  ``--shared-recipe`` (``recipes/tomoe_50_shared.yaml``) -> ``OUT/models/shared-pNN``,
  a stock Qwen2-MoE checkpoint.
- The static Wanda-sp baseline (``tomoe_modifier.baselines``): the same calibration
  set (its first ``--baseline-samples`` chunks; ToMoE samples from all of it), a
  uniform MLP width for p rounded to the recipe's ``width_multiple`` (64 if unset) ->
  ``OUT/models/static-pNN``, a plain ``LlamaForCausalLM``. Channel scores do not
  depend on p: computed once, cached.
- The static FLAP baseline (``--methods flap``): fluctuation scores on the same
  chunks, per-layer widths from one global ranking, bias compensation ->
  ``OUT/models/flap-pNN`` (the ToMoE architecture with one expert per layer);
  ``--methods flap-uniform``: the same scores and compensation at one width for
  every layer (FLAP's UL-UM structure) -> ``OUT/models/flap-uniform-pNN``.

``--import-tomoe DIR ...`` takes finished ``examples/smollm2_tomoe.py`` outputs
instead of retraining them: a folder whose ``results.json`` settings match the
sweep's (the recipe's ToMoE fields, sequence length, batch, samples) is copied to
``OUT/models/tomoe-pNN`` and measured like a sweep run; any mismatch is an error.

Each finished model folder gets ``bench_meta.json`` last (method, target and
achieved ratio, calibration tokens and wall time); a folder that has it is skipped,
so an interrupted sweep resumes where it stopped (``--force`` redoes). A summary
goes to ``OUT/results/sweep-<time>.json``. ``--model`` takes another dense folder
(and ``--text-split`` another text split) for quick runs on tiny models.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from benchmarks.common import (
    BENCH_META,
    common_parser,
    load_json,
    now,
    run_header,
    tomoe_recipe,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tomoe_50.yaml"
METHODS = ("tomoe", "shared", "static", "flap", "flap-uniform")
FLAP_WIDTHS = {"flap": "global", "flap-uniform": "uniform"}  # method -> flap_prune


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], parents=[common_parser()]
    )
    p.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.6, 0.5, 0.4])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="ToMoE recipe")
    p.add_argument(
        "--shared-recipe",
        default=str(DEFAULT_RECIPE.with_name("tomoe_50_shared.yaml")),
        help="ToMoE recipe of the shared layout",
    )
    p.add_argument("--model", help="dense model folder (default: SmolLM2 cache)")
    p.add_argument("--out-root", default="outputs/bench")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-calibration-samples", type=int, default=512)
    p.add_argument("--baseline-samples", type=int, default=512)
    p.add_argument("--import-tomoe", nargs="*", default=[], metavar="DIR")
    p.add_argument("--stats-windows", type=int, default=8)
    p.add_argument("--stats-context", type=int, default=512)
    p.add_argument("--text-split", default="wiki_train")
    p.add_argument("--stats-split", default="wiki_validation")
    p.add_argument("--force", action="store_true", help="redo finished runs")
    args = p.parse_args(argv)
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; use {', '.join(METHODS)}")
    return args


def tag(method: str, ratio: float) -> str:
    return f"{method}-p{int(round(ratio * 100)):02d}"


def recipe_fields(path: str) -> dict:
    """The ToMoEModifier fields of a recipe file (its one ToMoE stage)."""
    import yaml

    recipe = yaml.safe_load(Path(path).read_text())
    return dict(recipe["tomoe_stage"]["tomoe_modifiers"]["ToMoEModifier"])


class StaticScores:
    """Wanda-sp channel scores of the dense model, computed once and cached."""

    def __init__(self, args, model_dir: Path, dataset, cache: Path):
        self.args, self.model_dir = args, model_dir
        self.dataset, self.cache = dataset, cache
        self._value = None

    def key(self) -> dict:
        a = self.args
        return {
            "model": str(self.model_dir.resolve()),
            "samples": min(a.baseline_samples, len(self.dataset)),
            "seq_len": a.seq_len,
            "split": a.text_split,
            "seed": a.seed,
        }

    def get(self) -> dict:
        import torch

        if self._value is not None:
            return self._value
        if self.cache.is_file():
            cached = torch.load(self.cache, weights_only=False)
            if cached.get("key") == self.key():
                self._value = cached
                return cached
        from transformers import AutoModelForCausalLM

        from tomoe_modifier.baselines import channel_scores, iter_batches

        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=torch.float32
        )
        rows = self.dataset.select(range(self.key()["samples"]))
        t0 = time.perf_counter()
        scored = channel_scores(model, iter_batches(rows, self.args.batch_size))
        scored["seconds"] = round(time.perf_counter() - t0, 2)
        scored["key"] = self.key()
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(scored, self.cache)
        self._value = scored
        return scored


def run_static(args, ratio, model_dir, tokenizer, scores: StaticScores, out: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from tomoe_modifier.baselines import prune_with_scores

    multiple = recipe_fields(args.recipe).get("width_multiple") or 64
    scored = scores.get()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model, report = prune_with_scores(model, scored["scores"], ratio, multiple)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "method": "static",
        "target_active_ratio": ratio,
        "active_ratio": report["active_ratio"],
        "active_ratio_worst_case": report["active_ratio"],
        "intermediate_size": report["intermediate_size"],
        "score_mass_kept": report["score_mass_kept"],
        "calibration_tokens": scored["tokens"],
        "calibration_samples": scored["samples"],
        "scoring_s": scored["seconds"],
        "calibration_wall_s": round(scored["seconds"] + time.perf_counter() - t0, 2),
        "calibration_note": "channel scores computed once for all ratios",
        "width_multiple": multiple,
    }


def run_flap(args, method, ratio, model_dir, tokenizer, dataset, out: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from tomoe_modifier.baselines import flap_prune, iter_batches

    rows = dataset.select(range(min(args.baseline_samples, len(dataset))))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model, report = flap_prune(
        model, iter_batches(rows, args.batch_size), ratio, widths=FLAP_WIDTHS[method]
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "method": method,
        "target_active_ratio": ratio,
        "active_ratio": report["active_ratio"],
        "active_ratio_worst_case": report["active_ratio"],
        "widths": report["widths"],
        "calibration_tokens": report["tokens"],
        "calibration_samples": report["samples"],
        "calibration_wall_s": round(time.perf_counter() - t0, 2),
    }


def tomoe_meta(args, ratio, out, stats_windows, report, wall, recipe=None):
    """bench_meta of a ToMoE folder: its active ratio measured on held-out text."""
    recipe = recipe or args.recipe
    import torch
    from transformers import AutoModelForCausalLM

    from tomoe_modifier.stats import active_parameter_stats

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    batches = [{"input_ids": torch.tensor([w])} for w in stats_windows]
    active = active_parameter_stats(model, batches)
    return {
        "method": "tomoe",
        "expert_layout": report.get("expert_layout", "paper"),
        "target_active_ratio": ratio,
        "active_ratio": active["active_ratio_mean"],
        "active_ratio_worst_observed": active["active_ratio_worst_observed"],
        "active_ratio_worst_case": active["active_ratio_worst_case"],
        "active_ratio_uniform_routing": report.get("active_ratio_uniform_routing"),
        "active_stats_tokens": active["tokens"],
        "expert_usage": active["expert_usage"],
        "union_sizes": report.get("union_sizes"),
        "calibration_tokens": report["tokens"],
        "train_s": report["train_seconds"],
        "calibration_wall_s": round(wall, 2),
        "compute_dtype": report["compute_dtype"],
        "tomoe": {**recipe_fields(recipe), "target_active_ratio": ratio},
    }


def run_tomoe(args, ratio, model_dir, dataset, stats_windows, out: Path, recipe):
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    report_path = out / "tomoe_report.json"
    text, _ = tomoe_recipe(
        recipe, target_active_ratio=ratio, report_path=str(report_path)
    )
    active_session().reset()
    t0 = time.perf_counter()
    oneshot(
        model=str(model_dir),
        dataset=dataset,
        recipe=text,
        max_seq_length=args.seq_len,
        num_calibration_samples=args.num_calibration_samples,
        batch_size=args.batch_size,
        output_dir=str(out),
    )
    wall = time.perf_counter() - t0
    active_session().reset()
    report = load_json(report_path)
    return tomoe_meta(args, ratio, out, stats_windows, report, wall, recipe)


def import_tomoe(args, folder: Path, root: Path, stats_windows) -> tuple[float, dict]:
    """Copy a finished example run into the sweep after checking its settings."""
    results = load_json(folder / "results.json")
    ratio = results["target_active_ratio"]
    ours = {
        "max_sequence_length": args.seq_len,
        "batch_size": args.batch_size,
        "num_calibration_samples": args.num_calibration_samples,
        "tomoe": {**recipe_fields(args.recipe), "target_active_ratio": ratio},
    }
    theirs = {k: results["settings"].get(k) for k in ours}
    wrong = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
    if wrong:
        raise SystemExit(
            f"{folder} was trained with other settings than this sweep "
            f"(example, sweep): {wrong}; rerun the example with the sweep's settings "
            "or drop it from --import-tomoe"
        )
    out = root / "models" / tag("tomoe", ratio)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(folder, out)
    report = load_json(out / "tomoe_report.json")
    meta = tomoe_meta(
        args, ratio, out, stats_windows, report, results["calibration_wall_s"]
    )
    meta["imported_from"] = str(folder.resolve())
    return ratio, meta


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    import tomoe_modifier  # noqa: F401  (registers ToMoEModifier + architectures)
    from tomoe_modifier.assets import (
        build_calibration_dataset,
        load_split,
        prepare_smollm2,
        token_windows,
    )
    from tomoe_modifier.precision import machine_info

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else prepare_smollm2()
    root = Path(args.out_root)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = now()
    dataset = build_calibration_dataset(
        tokenizer, load_split(args.text_split), args.seq_len, seed=args.seed
    )
    windows = token_windows(
        tokenizer, load_split(args.stats_split), args.stats_context
    )[: args.stats_windows]
    scores = StaticScores(
        args, model_dir, dataset, root / "models" / "static_scores.pt"
    )

    runs = []
    imported = {}
    for folder in args.import_tomoe:
        ratio, meta = import_tomoe(args, Path(folder), root, windows)
        imported[ratio] = meta
    for ratio in args.ratios:
        for method in args.methods:
            out = root / "models" / tag(method, ratio)
            marker = out / BENCH_META
            if marker.is_file() and not args.force:
                print(f"skip {out}: {BENCH_META} exists (use --force to redo)")
                runs.append({"path": str(out), "skipped": True, **load_json(marker)})
                continue
            print(f"\n=== {out.name} ===", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            if method == "tomoe" and ratio in imported:
                meta = imported[ratio]
            elif method in ("tomoe", "shared"):
                recipe = args.recipe if method == "tomoe" else args.shared_recipe
                meta = run_tomoe(args, ratio, model_dir, dataset, windows, out, recipe)
            elif method in FLAP_WIDTHS:
                meta = run_flap(args, method, ratio, model_dir, tokenizer, dataset, out)
            else:
                meta = run_static(args, ratio, model_dir, tokenizer, scores, out)
            meta.update(
                name=out.name,
                dense_model=str(model_dir),
                calibration_split=args.text_split,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                calibration_pool_samples=len(dataset),
                seed=args.seed,
                finished=now(),
                machine=machine_info(),
            )
            write_json(marker, meta)  # last: marks the run finished
            runs.append({"name": out.name, "path": str(out), "skipped": False, **meta})
            print(
                f"{out.name}: active ratio {meta['active_ratio']:.3f} "
                f"(target {ratio}), {meta['calibration_tokens']} calibration tokens, "
                f"{meta['calibration_wall_s']:.0f}s"
            )

    stamp = time.strftime("%Y%m%d-%H%M%S")
    summary = {
        **run_header("sweep", started),
        "settings": {k: v for k, v in vars(args).items()},
        "tomoe": recipe_fields(args.recipe),
        "dense_model": str(model_dir),
        "runs": runs,
    }
    path = write_json(root / "results" / f"sweep-{stamp}.json", summary)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
