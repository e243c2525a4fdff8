"""Pick the compute dtype from what the machine can actually do fast."""

from __future__ import annotations

import platform

import torch

__all__ = ["choose_compute_dtype", "machine_info"]


def _cpu_has_avx512_bf16() -> bool:
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def _cpu_has_amx() -> bool:
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def _cpu_has_fast_bf16() -> bool:
    # Only AMX tiles make bf16 GEMMs faster than fp32 on a CPU. AVX512_BF16 alone
    # does not: a ToMoE training step on SmolLM2 ran 1.51x slower in bf16 than in
    # fp32 on a 2-core Xeon with AVX512_BF16 and no AMX (benchmarks.train_step,
    # benchmarks/results/train_step.json); on AVX2 machines bf16 ran ~6x slower.
    return _cpu_has_amx()


def choose_compute_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 where the device runs it faster than float32 (CUDA with bf16, a
    CPU with AMX), else float32."""
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
        "cpu_avx512_bf16": _cpu_has_avx512_bf16(),
        "cpu_amx": _cpu_has_amx(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), or the platform's, so results
    from different machines are not mistaken for one another."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
