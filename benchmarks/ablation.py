"""
Each quality lever alone and combined, at one training budget, on validation text.

    python -m benchmarks.ablation [--ratio 0.5] [--iters 200] [--variants all] \\
        [--out-root outputs/ablation]

Every variant is the shipped recipe (``--recipe``, default ``recipes/tomoe_50.yaml``)
with the target ratio, the step count and the variant's own fields overridden, run
through ``oneshot`` on SmolLM2-135M-Instruct with the main example's calibration
settings (Wikipedia train articles in 128-token windows, batch 4, 512 samples per
pass; ``calibration: mix`` adds the model's own replies to varied prompts). Quality
is token perplexity on the held-out Wikipedia *validation* articles and on news
(lm-eval, float32, context 512): the test articles stay unseen until the final
table. Writes ``OUT/results/<variant>.json`` (a finished variant is skipped) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.common import (
    common_parser,
    load_json,
    now,
    run_header,
    tomoe_recipe,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# variant -> (modifier overrides, calibration data); "+" rows add one lever to the
# shipped recipe (activation start)
VARIANTS: dict[str, tuple[dict, str]] = {
    "activation start (default)": ({"warm_start": "activation"}, "wiki"),
    "layer-wise start": ({"warm_start": "layerwise"}, "wiki"),
    "layer-wise start with per-layer widths": (
        {"warm_start": "layerwise", "warm_start_widths": "per_layer"},
        "wiki",
    ),
    "+ attention pruning": ({"attention_pruning": True}, "wiki"),
    "+ expert bias": ({"expert_bias": True}, "wiki"),
    "+ mixed calibration": ({}, "mix"),
    "+ 16 experts": ({"num_experts": 16}, "wiki"),
    "+ 32 experts": ({"num_experts": 32}, "wiki"),
    "+ cached teacher + hidden term + long windows": (
        {
            "teacher_cache": "sampled",
            "hidden_distill_weight": 1.0,
            "train_window": 128,
            "long_window_every": 4,
        },
        "wiki512",
    ),
    "shared layout (stock Qwen2-MoE export)": ({"expert_layout": "shared"}, "wiki"),
    "train_mode layerwise": (
        {"train_mode": "layerwise", "warm_start_tokens": 16384},
        "wiki",
    ),
    "train_mode layerwise_then_global": (
        {"train_mode": "layerwise_then_global", "warm_start_tokens": 16384},
        "wiki",
    ),
}
TASKS = ("tomoe_wiki_validation", "tomoe_news")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], parents=[common_parser()]
    )
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--recipe", default=str(REPO / "recipes" / "tomoe_50.yaml"))
    p.add_argument(
        "--variants",
        default="all",
        help="comma-separated variant names or their file slugs, or all",
    )
    p.add_argument("--extra", default="{}", help="JSON fields added to every variant")
    p.add_argument("--out-root", default="outputs/ablation")
    p.add_argument(
        "--news",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score news (75k tokens, ~2.5 min per variant on 2 cores)",
    )
    p.add_argument("--force", action="store_true")
    return p.parse_args(argv)


def calibration(tokenizer, model_dir, kind: str):
    from tomoe_modifier.assets import (
        build_calibration_dataset,
        load_split,
        prepare_generated_text,
    )

    texts = load_split("wiki_train")
    if kind == "mix":
        texts = texts + prepare_generated_text(model_dir)
    length = 512 if kind == "wiki512" else 128
    return build_calibration_dataset(tokenizer, texts, length, seed=0), length


def run_variant(args, name: str, fields: dict, kind: str, out: Path) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from transformers import AutoTokenizer

    from tomoe_modifier.assets import prepare_smollm2
    from tomoe_modifier.lm_eval_tasks import evaluate_perplexity
    from tomoe_modifier.stats import peak_rss_mib

    model_dir = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset, length = calibration(tokenizer, model_dir, kind)
    overrides = {
        "target_active_ratio": args.ratio,
        "iters": args.iters,
        "seed": args.seed,
        **json.loads(args.extra),
        **fields,
    }
    _, settings = tomoe_recipe(args.recipe, **overrides)
    text, _ = tomoe_recipe(
        args.recipe, **overrides, report_path=str(out / "tomoe_report.json")
    )
    batch = 1 if length == 512 else 4
    active_session().reset()
    t0 = time.perf_counter()
    oneshot(
        model=str(model_dir),
        dataset=dataset,
        recipe=text,
        max_seq_length=length,
        num_calibration_samples=512 if length == 128 else 128,
        batch_size=batch,
        output_dir=str(out / "model"),
    )
    wall = time.perf_counter() - t0
    active_session().reset()
    tasks = TASKS if args.news else TASKS[:1]
    ppl = evaluate_perplexity(
        out / "model", tasks, max_length=512, dtype="float32", device="cpu"
    )["results"]
    report = load_json(out / "tomoe_report.json")
    return {
        "variant": name,
        "fields": settings,
        "calibration": kind,
        "wiki_validation_ppl": ppl["tomoe_wiki_validation"]["token_perplexity"],
        "news_ppl": ppl["tomoe_news"]["token_perplexity"] if args.news else None,
        "active_ratio_uniform_routing": report.get("active_ratio_uniform_routing"),
        "calibration_tokens": report.get("tokens"),
        "oneshot_wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def dense_reference(root: Path) -> dict:
    from tomoe_modifier.assets import prepare_smollm2
    from tomoe_modifier.lm_eval_tasks import evaluate_perplexity

    path = root / "results" / "dense.json"
    if path.is_file():
        return load_json(path)
    ppl = evaluate_perplexity(
        prepare_smollm2(), TASKS, max_length=512, dtype="float32", device="cpu"
    )["results"]
    result = {
        "wiki_validation_ppl": ppl["tomoe_wiki_validation"]["token_perplexity"],
        "news_ppl": ppl["tomoe_news"]["token_perplexity"],
    }
    write_json(path, result)
    return result


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def variant_names(spec: str) -> list[str]:
    """``--variants``: "all", or comma-separated names or slugs (the result file
    names), checked before any run starts."""
    if spec == "all":
        return list(VARIANTS)
    by_slug = {slug(name): name for name in VARIANTS}
    names = []
    for item in (part.strip() for part in spec.split(",")):
        name = item if item in VARIANTS else by_slug.get(item)
        if name is None:
            raise SystemExit(
                f"unknown variant {item!r}; choose from: "
                + ", ".join(f"{n!r} ({slug(n)})" for n in VARIANTS)
            )
        names.append(name)
    return names


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    import tomoe_modifier  # noqa: F401  (registers ToMoEModifier)

    torch.set_num_threads(args.threads)
    root = Path(args.out_root)
    names = variant_names(args.variants)
    started = now()
    dense = dense_reference(root)
    rows = []
    for name in names:
        fields, kind = VARIANTS[name]
        path = root / "results" / f"{slug(name)}.json"
        if path.is_file() and not args.force:
            rows.append(load_json(path))
            continue
        print(f"\n=== {name} ===", flush=True)
        result = run_variant(args, name, fields, kind, root / slug(name))
        result.update(ratio=args.ratio, iters=args.iters, finished=now())
        write_json(path, {**run_header("ablation", started), **result})
        rows.append(result)
    print(
        f"\n| variant (p = {args.ratio}, {args.iters} steps) | Wikipedia validation "
        "ppl (x dense) | news ppl (x dense) | oneshot s |"
    )
    print("|---|---|---|---|")
    print(f"| dense | {dense['wiki_validation_ppl']:.2f} | {dense['news_ppl']:.2f} | |")
    for r in rows:
        wiki, news = r["wiki_validation_ppl"], r["news_ppl"]
        wiki_x = wiki / dense["wiki_validation_ppl"]
        news_cell = (
            "not run"
            if news is None
            else (f"{news:.2f} (x{news / dense['news_ppl']:.2f})")
        )
        print(
            f"| {r['variant']} | {wiki:.2f} (x{wiki_x:.2f}) | {news_cell} "
            f"| {r['oneshot_wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
