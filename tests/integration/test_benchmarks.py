"""The committed benchmark chain runs end to end on a tiny model and writes a report."""

import json
import os
import subprocess

import pytest

from tests.testing_utils import REPO, make_model, save_model, shipped_recipe


@pytest.mark.integration
def test_run_all_writes_tables_and_plots(tmp_path, text_cache):
    dense = save_model(make_model("llama"), tmp_path / "dense")
    report = tmp_path / "report"
    env = {
        **os.environ,
        "MODEL": dense,
        "BENCH_ROOT": str(tmp_path / "bench"),
        "REPORT_DIR": str(report),
        "RECIPE": shipped_recipe(tmp_path, "tomoe_50.yaml", 2, width_multiple=16),
        "ROUNDS": "1",
        "DTYPES": "float32",
        "COMPILE": "0",  # compiling tiny models costs minutes; unit tests cover it
        "COMPILED_RATIO": "60",
        "SWEEP_ARGS": "--ratios 0.6 --seq-len 16 --batch-size 2 "
        "--num-calibration-samples 8 --baseline-samples 8 --stats-windows 2 "
        "--stats-context 32 --shared-recipe "
        + shipped_recipe(
            tmp_path / "shared",
            "tomoe_50_shared.yaml",
            2,
            width_multiple=16,
            num_experts=4,
        ),
        "QUALITY_ARGS": "--max-length 32 --limit 2",
        "SPEED_ARGS": "--prompt-source random --prompt-tokens 8 --new-tokens 4 "
        "--prefill-tokens 16 --batch 2 --no-memory",
        "PROFILE_ARGS": "--prompt-tokens 8 --new-tokens 4 --prefill-tokens 16",
    }
    result = subprocess.run(
        ["bash", "benchmarks/run_all.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    text = (report / "RESULTS.md").read_text()
    for heading in (
        "## Perplexity",
        "## Speed and memory, float32, eager",
        "## Where batch-1 decode time goes, float32",
        "## Where prefill time goes, float32",
        "## Calibration cost",
    ):
        assert heading in text
    for name in (
        "static Wanda-sp",
        "static FLAP",
        "static FLAP (uniform widths)",
        "ToMoE paper",
        "ToMoE shared",
    ):
        assert name in text
    assert (report / "ppl_vs_active_ratio.png").stat().st_size > 0
    assert (report / "speedup_vs_active_ratio_float32_eager.png").stat().st_size > 0
    speed = json.loads(
        (tmp_path / "bench/results/speed-float32-eager.json").read_text()
    )
    names = {m["name"] for m in speed["models"]}
    assert names >= {"tomoe-p60", "shared-p60", "shared-p60+cpu_kernels", "static-p60"}
    # the JSONs behind the report are copied next to it and regenerate it
    copied = json.loads((report / "results/speed-float32-eager.json").read_text())
    assert copied == speed
    again = tmp_path / "again.md"
    subprocess.run(
        [
            "python",
            "-m",
            "benchmarks.report",
            "--results",
            str(report / "results"),
            "--out",
            str(again),
        ],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    assert "## Speed and memory, float32, eager" in again.read_text()
