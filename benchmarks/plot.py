"""
Plots of the sweep: perplexity and speed-up against the active parameter ratio.

    python -m benchmarks.plot [--results outputs/bench/results] [--out-dir benchmarks]

Reads ``RESULTS/quality/*.json`` (quality.py) and, per dtype, the newest
``RESULTS/speed*.json`` (speed.py, or ``--speed FILE``) and writes
``OUT_DIR/ppl_vs_active_ratio.png`` (one panel per task: ToMoE and the static
baseline against the measured active ratio, dense as a horizontal line) and
``OUT_DIR/speedup_vs_active_ratio_<dtype>.png`` (decode batch 1, decode batch N and
prefill tokens/s over dense's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import load_json, series

STYLE = {
    "ToMoE paper": {"color": "tab:blue", "marker": "o"},
    "ToMoE shared (stock transformers)": {"color": "tab:green", "marker": "^"},
    "ToMoE shared (CPU kernel)": {"color": "tab:olive", "marker": "v"},
    "static FLAP": {"color": "tab:red", "marker": "D"},
    "static Wanda-sp": {"color": "tab:orange", "marker": "s"},
}
TASK_TITLES = {"tomoe_wiki_test": "Wikipedia (held out)", "tomoe_news": "news"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--results", default="outputs/bench/results")
    p.add_argument("--speed", help="speed JSON (default: newest RESULTS/speed*.json)")
    p.add_argument("--out-dir", default="benchmarks")
    p.add_argument(
        "--metric",
        default="word_perplexity",
        choices=("word_perplexity", "token_perplexity", "byte_perplexity"),
    )
    return p.parse_args(argv)


def speed_key(speed: dict) -> tuple[str, str]:
    s = speed["settings"]
    return s["dtype"], s.get("mode", "eager")


def load_results(results: Path, speed: str | None = None) -> tuple[list, list]:
    """Quality records and the speed records: the newest per (dtype, mode),
    float32 and eager first."""
    quality = [load_json(p) for p in sorted((results / "quality").glob("*.json"))]
    if speed:
        return quality, [load_json(speed)]
    files = [load_json(p) for p in results.glob("speed*.json")]
    files.sort(key=lambda r: r.get("finished", ""))
    newest = {speed_key(r): r for r in files}
    order = sorted(newest, key=lambda k: (k[0] != "float32", k[1] != "eager"))
    return quality, [newest[k] for k in order]


def speed_plot_name(speed: dict) -> str:
    dtype, mode = speed_key(speed)
    return f"speedup_vs_active_ratio_{dtype}_{mode}.png"


def _series(rows: list[tuple[str, float, float]]):
    """Per series (ToMoE first), points sorted by active ratio."""
    out: dict[str, tuple[list, list]] = {m: ([], []) for m in STYLE}
    for method, x, y in sorted(rows, key=lambda r: r[1]):
        xs, ys = out.setdefault(method, ([], []))
        xs.append(x)
        ys.append(y)
    return {m: xy for m, xy in out.items() if xy[0]}


def plot_quality(quality: list, metric: str, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    found = {t for q in quality for t in q["results"]}
    tasks = [t for t in TASK_TITLES if t in found] + sorted(found - set(TASK_TITLES))
    if not tasks:
        return None
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(5.2 * len(tasks), 4), squeeze=False
    )
    for ax, task in zip(axes[0], tasks):
        rows, dense = [], None
        for q in quality:
            model, value = q["model"], q["results"].get(task, {}).get(metric)
            if value is None:
                continue
            if model["method"] == "dense":
                dense = value
            elif model.get("active_ratio") is not None:
                rows.append((series(model), model["active_ratio"], value))
        for name, (xs, ys) in _series(rows).items():
            ax.plot(xs, ys, linestyle="-", label=name, **STYLE.get(name, {}))
        if dense is not None:
            ax.axhline(
                dense, color="black", linestyle="--", label=f"dense ({dense:.2f})"
            )
        ax.set_title(TASK_TITLES.get(task, task))
        ax.set_xlabel("active attention+MLP parameters / dense")
        ax.set_yscale("log")  # static pruning blows up by orders of magnitude
        ax.set_ylabel(metric.replace("_", " ") + " (log scale, lower is better)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Perplexity vs active parameters (lm-eval, context 512)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_speed(speed: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    batch = speed["settings"]["batch"]
    panels = [
        ("decode_b1_tps", "decode, batch 1"),
        ("decode_bn_tps", f"decode, batch {batch}"),
    ]
    if speed["settings"].get("mode", "eager") == "eager":
        panels.append(
            ("prefill_tps", f"prefill {speed['settings']['prefill_tokens']} tokens")
        )
    candidates = [m for m in speed["models"] if m["role"] == "candidate"]
    if not candidates:
        return None
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 4), squeeze=False
    )
    for ax, (metric, title) in zip(axes[0], panels):
        rows = [
            (series(m), m["active_ratio"], m["speedup_vs_dense"][metric])
            for m in candidates
            if m.get("active_ratio") is not None
        ]
        for name, (xs, ys) in _series(rows).items():
            ax.plot(xs, ys, linestyle="-", label=name, **STYLE.get(name, {}))
        ax.axhline(1.0, color="black", linestyle="--", label="dense")
        ax.set_title(title)
        ax.set_xlabel("active attention+MLP parameters / dense")
        ax.set_ylabel("tokens/s over dense (higher is better)")
        ax.grid(alpha=0.3)
        ax.legend()
    s = speed["settings"]
    fig.suptitle(
        f"Speed-up vs dense on {speed['machine']['cpu_capability']} CPU, "
        f"{s['threads']} threads, {s['dtype']}, {s.get('mode', 'eager')}, median of "
        f"{s['rounds']} rounds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    quality, speeds = load_results(Path(args.results), args.speed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if quality:
        written.append(
            plot_quality(quality, args.metric, out / "ppl_vs_active_ratio.png")
        )
    for speed in speeds:
        written.append(plot_speed(speed, out / speed_plot_name(speed)))
    written = [str(p) for p in written if p]
    if not written:
        raise SystemExit(
            f"nothing to plot in {args.results}: run quality.py and speed.py first"
        )
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
