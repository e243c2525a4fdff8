"""compute_dtype "auto": bfloat16 only where it is faster than float32."""

import pytest
import torch

from tomoe_modifier.precision import choose_compute_dtype, machine_info


@pytest.mark.unit
@pytest.mark.parametrize(
    "avx512_bf16, amx, expected",
    [
        (False, False, torch.float32),
        (True, False, torch.float32),  # measured 1.5x slower in bf16 (train_step)
        (True, True, torch.bfloat16),
    ],
)
def test_cpu_picks_bf16_only_with_amx(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert choose_compute_dtype("cpu") == expected
    info = machine_info()  # every benchmark records what the choice was made from
    assert (info["cpu_avx512_bf16"], info["cpu_amx"]) == (avx512_bf16, amx)
    assert info["cpu_fast_bf16"] == (expected == torch.bfloat16)
