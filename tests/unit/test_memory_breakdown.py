"""benchmarks.memory's sampler: what resident memory is made of at its peak."""

import time

import pytest
import torch

from benchmarks.memory import RssBreakdown


@pytest.mark.unit
def test_breakdown_splits_anonymous_and_file_pages_at_the_peak(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "weights.bin"
    torch.randn(16 * 2**20 // 4).numpy().tofile(path)  # 16 MiB file
    groups = {"weights": str(tmp_path)}
    with RssBreakdown(groups, interval_s=0.01, packages=("tests",)) as breakdown:
        mapped = torch.from_file(str(path), size=16 * 2**20 // 4, dtype=torch.float32)
        mapped.sum()  # fault the file pages in
        anon = torch.ones(64 * 2**20 // 4)  # 64 MiB of anonymous pages
        time.sleep(0.2)
    peak = breakdown.at_peak
    assert peak["file_mib"]["weights"] >= 15
    assert peak["anonymous_mib"] >= 64
    assert peak["rss_mib"] >= peak["anonymous_mib"] + peak["file_mib"]["weights"] - 1
    assert peak["live_tensor_mib"] >= 64 + 15  # the ones tensor and the mapped file
    assert any("float32" in t for t in peak["largest_tensors"])
    assert any(f"1 x ({64 * 2**20 // 4},) float32" in g for g in peak["live_by_shape"])
    # where the peak was reached: this test, in the thread that entered the sampler
    assert any(":test_breakdown_splits" in call for call in peak["running"])
    del anon, mapped
