"""Self-contained, cached preparation of the real model and text the project needs.

Public names are resolved lazily, so ``import tomoe_modifier.assets`` stays cheap and
does not pull in torch, transformers or datasets until a function is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "SPLITS",
    "atomic_dir",
    "build_calibration_dataset",
    "cache_dir",
    "download_wheel",
    "load_split",
    "prepare_generated_text",
    "prepare_smollm2",
    "prepare_text",
    "token_windows",
]

_WHERE = {
    "atomic_dir": "cache",
    "cache_dir": "cache",
    "download_wheel": "cache",
    "prepare_smollm2": "smollm2",
    "prepare_generated_text": "generated",
    "SPLITS": "text",
    "load_split": "text",
    "prepare_text": "text",
    "build_calibration_dataset": "calibration",
    "token_windows": "calibration",
}

if TYPE_CHECKING:
    from tomoe_modifier.assets.cache import atomic_dir, cache_dir, download_wheel
    from tomoe_modifier.assets.calibration import (
        build_calibration_dataset,
        token_windows,
    )
    from tomoe_modifier.assets.generated import prepare_generated_text
    from tomoe_modifier.assets.smollm2 import prepare_smollm2
    from tomoe_modifier.assets.text import SPLITS, load_split, prepare_text


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
