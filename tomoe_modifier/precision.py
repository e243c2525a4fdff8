"""Pick the compute dtype from what the machine can actually do fast."""

from __future__ import annotations

import platform

import torch

__all__ = ["choose_compute_dtype", "machine_info"]


def _cpu_has_fast_bf16() -> bool:
    # AVX-512 alone is not enough: bf16 matmuls are only fast with AVX512_BF16/AMX;
    # on AVX2 machines they ran ~6x slower than fp32.
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def choose_compute_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 where the device runs it fast, else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    return torch.float32


def machine_info() -> dict:
    """What every benchmark records next to its numbers."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_fast_bf16": _cpu_has_fast_bf16(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
