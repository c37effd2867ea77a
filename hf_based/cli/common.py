"""Argument types and checks that several commands share."""

import argparse
import json
from pathlib import Path

import torch

from hf_based.bench.report import resolve_device
from hf_based.errors import UsageError


def int_list(text: str) -> tuple[int, ...]:
    """'1,2, 3' -> (1, 2, 3): integers >= 1 separated by commas or spaces."""
    try:
        values = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def output_directory(out: str, plot_only: bool, run_first: str) -> tuple[Path, dict | None]:
    """`hf-based mqar` / `bench`: --out as a directory, and with --plot-only the results.json a run left there."""
    out = Path(out)
    if out.is_file():
        raise UsageError(f"--out {out} is a file; give a directory")
    if not plot_only:
        return out, None
    path = out / "results.json"
    if not path.is_file():
        raise UsageError(f"--plot-only: {path} does not exist; {run_first}")
    return out, json.loads(path.read_text())


def device(name: str | None) -> torch.device:
    """--device: cuda if available, else cpu, by default; a one-line error for an unknown or unavailable device."""
    try:
        return resolve_device(name)
    except ValueError as error:
        raise UsageError(str(error)) from error
