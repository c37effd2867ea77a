"""Finding and reading a transformers checkpoint's config: a local directory, a hub id, or a GGUF file."""

import importlib.util
from pathlib import Path

from hf_based.errors import UsageError


def gguf_location(base: str) -> tuple[Path, str] | None:
    """(directory, file name) when `base` is a .gguf file or a directory holding exactly one (and no config.json)."""
    path = Path(base).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise UsageError(f"{path} holds several GGUF files ({', '.join(f.name for f in files)}); name one")
        if files:
            return path, files[0].name
    return None


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UsageError("reading a GGUF checkpoint needs the `gguf` package: pip install gguf")


def load_config(base: str):
    """The config of checkpoint `base` (directory, hub id or .gguf file) without loading any weights."""
    from transformers import AutoConfig

    path = Path(base).expanduser()
    if not path.exists() and (base.startswith(("/", ".", "~")) or base.endswith(".gguf") or base.count("/") > 1):
        raise UsageError(f"BASE {base!r} does not exist")
    gguf = gguf_location(base)
    try:
        if gguf is not None:
            require_gguf()
            return AutoConfig.from_pretrained(gguf[0], gguf_file=gguf[1])
        return AutoConfig.from_pretrained(base)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(
            f"cannot load BASE {base!r}: it is not a readable checkpoint directory, GGUF file or reachable hub id "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from error
