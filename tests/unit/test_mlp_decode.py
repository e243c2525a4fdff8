"""benchmarks.mlp_decode: MLP-only decode timing of dense, ToMoE and static."""

import json

import pytest
import torch

from benchmarks import mlp_decode


@pytest.mark.unit
def test_mlp_decode_times_every_path_and_records_rounds(tmp_path):
    out = tmp_path / "mlp.json"
    argv = ["--dtype", "float32", "--layers", "2", "--hidden", "64"]
    argv += ["--intermediate", "96", "--tokens", "3", "--rounds", "2"]
    argv += ["--out", str(out)]
    mlp_decode.main(argv)
    result = json.loads(out.read_text())
    assert set(result["ms_per_token"]) == {"dense", "tomoe", "static"}
    assert all(t > 0 for t in result["ms_per_token"].values())
    assert len(result["rounds"]) == 2
    assert result["machine"]["cpu_capability"]
    assert result["settings"]["expert_fraction"] == pytest.approx(1 / 3)


@pytest.mark.unit
def test_mlp_decode_experts_hold_the_requested_fraction_of_channels():
    args = mlp_decode.parse_args(["--layers", "1", "--hidden", "64", "--out", "x"])
    args.intermediate = 96
    moe = mlp_decode.build(args)["tomoe"][0]
    assert moe.expert_widths().tolist() == [32] * args.experts
    assert moe.router.weight.dtype == torch.float32  # as converted models keep it
