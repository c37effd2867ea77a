"""Small helpers shared across the package: dtype names, number formatting, plotting, the repository's data folder,
CPU threads, lazy package exports. Imports torch only in the functions that need it, for the command line's start."""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hf_based.errors import UsageError

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str | torch.dtype, auto: torch.dtype | None = None) -> torch.dtype | None:
    """A dtype from its name (one of DTYPES, or "auto" -> `auto`); a one-line UsageError for any other name."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return auto
    if name not in DTYPES:
        raise UsageError(f"dtype={name!r} is not supported; accepted: auto, {', '.join(DTYPES)}")
    return getattr(torch, name)


def format_number(value, digits: int = 4) -> str:
    """A table cell: '-' for a missing value, floats to `digits` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing (then plots are skipped: rerun the
    command with --plot-only where matplotlib is installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def shared_data_dir() -> Path:
    """shared/data beside the repository checkout this package runs from (may not exist, e.g. when installed)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def free_cpu_threads() -> int:
    """The CPU cores this process may use, less those that other work keeps busy right now, at least 1. torch's
    default, one thread per core, stalls when other processes share the cores: each of its parallel regions waits
    for its slowest thread."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    free = (os.cpu_count() or usable) - busy_cores()
    return max(1, min(usable, round(free)))


def busy_cores(seconds: float = 0.2) -> float:
    """How many cores are busy: measured over `seconds` from /proc/stat on Linux, else the last minute's load
    average (which lags: it still counts processes that ended seconds ago)."""
    try:
        before = _cpu_ticks()
        time.sleep(seconds)
        after = _cpu_ticks()
    except OSError:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total = sum(after) - sum(before)
    idle = sum(after[3:5]) - sum(before[3:5])  # idle and iowait
    return (os.cpu_count() or 1) * (1 - idle / total) if total else 0.0


def _cpu_ticks() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(ticks) for ticks in stat.readline().split()[1:]]


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]):
    """A package's module `__getattr__` (PEP 562) for the names it exports from its modules ({module: names}): each
    is imported on first use, so that importing the package (e.g. for the command line's --help) imports no torch."""
    source = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        if name not in source:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source[name]), name)
        setattr(sys.modules[package], name, value)  # found directly from now on
        return value

    return __getattr__
