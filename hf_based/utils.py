"""Small helpers shared across the package: dtype names, number formatting, plotting, the repository's data folder,
CPU threads."""

import os
from pathlib import Path

import torch

from hf_based.errors import UsageError

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str | torch.dtype, auto: torch.dtype | None = None) -> torch.dtype | None:
    """A dtype from its name (one of DTYPES, or "auto" -> `auto`); a one-line UsageError for any other name."""
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
    """The CPU cores this process may use, less those that other work keeps busy (the last minute's load average),
    at least 1. torch's default, one thread per core, stalls when other processes share the cores: each of its
    parallel regions waits for its slowest thread."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))
