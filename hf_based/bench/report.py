"""What every benchmark result records about where it ran, and the small file writers the benchmarks share."""

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """$COMMIT if set (for runs on machines without the git history), else `git rev-parse --short HEAD`."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def resolve_device(name: str | None) -> torch.device:
    """--device: cuda if available, else cpu, by default; ValueError for an unknown or unavailable device."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return device


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """Date, commit, machine and library versions, for the header of a results file."""
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:  # the installed version without importing triton (its import fixes whether its kernels run interpreted)
        env["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pass
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    env["kernels"] = os.environ.get("HF_BASED_KERNELS", "auto")
    return env


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_lines(env: dict) -> str:
    return "\n".join(f"- {key}: {value}" for key, value in env.items())


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
