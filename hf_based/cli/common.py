"""Argument types and checks that several commands share."""

import argparse
import json
import uuid
from collections.abc import Callable
from pathlib import Path

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


def output_directory(out: str, plot_only: bool, run_first: str) -> tuple[Path, Path | None]:
    """`hf-based mqar` / `bench`: --out as a directory, and with --plot-only the results.json a run left there."""
    out = Path(out)
    if out.is_file():
        raise UsageError(f"--out {out} is a file; give a directory")
    if not plot_only:
        return out, None
    path = out / "results.json"
    if not path.is_file():
        raise UsageError(f"--plot-only: {path} does not exist; {run_first}")
    return out, path


def redraw(results: Path, draw: Callable[[dict], None], command: str) -> None:
    """--plot-only: `draw` the saved results; a file that is not the results.json of `command` is refused in one
    line (what it lacks is only found while drawing, so the drawing's lookup errors name it)."""
    try:
        saved = json.loads(results.read_bytes().decode("utf-8"))
        if not isinstance(saved, dict):
            raise TypeError(f"a JSON {type(saved).__name__}, not an object")
        draw(saved)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:  # ValueError: bad JSON too
        raise UsageError(
            f"--plot-only: {results} is not a results.json of hf-based {command} ({type(error).__name__}: {error}); "
            f"rerun hf-based {command} to write it again"
        ) from error


def check_writable(path: Path) -> None:
    """Fail now, not after the work, when `path` cannot be written: its folder is made and a file tried in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = path.with_name(f".{path.name}.{uuid.uuid4().hex}.probe")
    probe.touch()
    probe.unlink()


def device(name: str | None):
    """--device as a torch.device: cuda if available, else cpu, by default; a one-line error for an unknown or
    unavailable device."""
    from hf_based.bench.report import resolve_device

    try:
        return resolve_device(name)
    except ValueError as error:
        raise UsageError(str(error)) from error
