"""What both importers share: finding the source files, reading tensors safely, writing the checkpoint."""

import pickle
from pathlib import Path

import torch

from hf_based.errors import CheckpointError
from hf_based.outputs import model_directory


def resolve_source(src: str, filenames: tuple[str, ...]) -> Path:
    """A local directory, or a hub repository id downloaded (only `filenames`) with `snapshot_download`."""
    if Path(src).exists():
        return Path(src)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=list(filenames)))
    except (OSError, ValueError) as error:  # unknown repo, no network, malformed id
        raise CheckpointError(f"{src!r} is neither a local path nor a downloadable hub repository: {error}") from error


def is_count(value) -> bool:
    """An integer >= 1 (not a bool), as a size or count setting must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def load_tensors(path: Path) -> dict:
    """torch.load with weights_only=True (tensors and plain containers only), or a safetensors file; a file that is
    not one (truncated, corrupt, pickled objects) raises CheckpointError naming it."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; expected a weights file (.pt, .bin or .safetensors)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as error:
            raise CheckpointError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {error}"
            ) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:  # not tensors only / truncated / not torch
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "the file ends too early"
        raise CheckpointError(
            f"{path} cannot be loaded as plain tensors (weights_only=True; truncated or corrupt?): {reason}"
        ) from error


def save_checkpoint(model, tokenizer, out: str | Path, overwrite: bool = False) -> None:
    """An ordinary hf-based checkpoint: weights, config (with the remote-code files) and tokenizer in `out`, written
    whole or not at all (`hf_based.outputs.model_directory`); an existing model is replaced only with `overwrite`."""
    with model_directory(out, overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
