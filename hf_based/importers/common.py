"""What both importers share: finding the source files, reading tensors safely, writing the checkpoint."""

import pickle
from pathlib import Path

import torch

from hf_based.errors import CheckpointError


def resolve_source(src: str, filenames: tuple[str, ...]) -> Path:
    """A local directory, or a hub repository id downloaded (only `filenames`) with `snapshot_download`."""
    if Path(src).exists():
        return Path(src)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=list(filenames)))
    except (OSError, ValueError) as error:  # unknown repo, no network, malformed id
        raise CheckpointError(f"{src!r} is neither a local path nor a downloadable hub repository: {error}") from error


def load_tensors(path: Path) -> dict:
    """torch.load with weights_only=True (tensors and plain containers only), or a safetensors file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:  # not tensors only / not a torch file
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path} cannot be loaded as plain tensors (weights_only=True): {reason}") from error


def check_output_directory(out: str | Path) -> None:
    if Path(out).is_file():
        raise CheckpointError(f"{out} is a file; OUT must be a directory")


def save_checkpoint(model, tokenizer, out: str | Path) -> None:
    """An ordinary hf-based checkpoint: weights, config (with the remote-code files) and tokenizer in `out`."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
