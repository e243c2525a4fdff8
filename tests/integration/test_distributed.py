"""torchrun with 2 CPU processes (gloo): ranks stay identical, rank 0 saves, and the
result equals a single process on the same data."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.testing_utils import REPO, make_model, save_model

SCRIPT = REPO / "tests" / "integration" / "distributed_run.py"


def _run(args: list[str], nproc: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        torchrun = shutil.which("torchrun") or "torchrun"
        cmd = [torchrun, "--nproc-per-node", str(nproc), "--master-port", "29517"]
    else:
        cmd = [sys.executable]
    result = subprocess.run(
        [*cmd, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["global"])
def test_two_processes_equal_one_on_the_same_data(tmp_path, mode):
    dense = save_model(make_model("llama"), tmp_path / "dense")
    # one process on 8 samples, batch 2
    _run([dense, str(tmp_path / "one"), str(tmp_path / "one.pt"), "1", mode], 1)
    # two processes, each on its shard of 16 = the same 8 samples, batch 2 each:
    # the averaged gradients are the single process's
    _run([dense, str(tmp_path / "two"), str(tmp_path / "two.pt"), "2", mode], 2)
    single = torch.load(tmp_path / "one.pt.rank0")
    rank0 = torch.load(tmp_path / "two.pt.rank0")
    rank1 = torch.load(tmp_path / "two.pt.rank1")
    torch.testing.assert_close(rank0, rank1, atol=0, rtol=0)  # ranks in step
    torch.testing.assert_close(rank0, single, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "two" / "model.safetensors").is_file()  # rank 0 saved


@pytest.mark.integration
def test_layerwise_fits_see_every_ranks_shard(tmp_path):
    dense = save_model(make_model("llama"), tmp_path / "dense")
    # the layer fits gather all ranks' tokens: two ranks on the halves of 16
    # samples fit what one process fits on all 16
    _run([dense, str(tmp_path / "one"), str(tmp_path / "one.pt"), "2", "layerwise"], 1)
    _run([dense, str(tmp_path / "two"), str(tmp_path / "two.pt"), "2", "layerwise"], 2)
    single = torch.load(tmp_path / "one.pt.rank0")
    rank0 = torch.load(tmp_path / "two.pt.rank0")
    rank1 = torch.load(tmp_path / "two.pt.rank1")
    torch.testing.assert_close(rank0, rank1, atol=0, rtol=0)
    torch.testing.assert_close(rank0, single, atol=1e-5, rtol=1e-5)
