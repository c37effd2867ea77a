"""Writing a model directory so that it is never half-written: files go to a temporary directory beside OUT and are
moved in when all of them exist, `config.json` last, since a directory without it does not load as a model."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hf_based.errors import UsageError

LOAD_MARKER = "config.json"


def is_model_directory(path: Path) -> bool:
    return (path / LOAD_MARKER).is_file()


def check_output_directory(out: str | Path, overwrite: bool) -> Path:
    """OUT as a Path, refused when it is a file, or a finished model and `overwrite` is not set."""
    out = Path(out)
    if out.is_file():
        raise UsageError(f"{out} is a file; OUT must be a directory")
    if is_model_directory(out) and not overwrite:
        raise UsageError(f"{out} already holds a model; pass --overwrite to replace it, or choose another OUT")
    return out


@contextmanager
def model_directory(out: str | Path, overwrite: bool = False, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory to save into; on success its files replace OUT's (an existing model only with
    `overwrite`), on failure it is deleted and OUT stays as it was.

    When OUT holds a model, its files are removed first (a sharded checkpoint's stale index included), except the
    names in `keep` (e.g. a conversion's resumable checkpoints); other directories keep what they hold.
    """
    out = check_output_directory(out, overwrite)
    replacing = is_model_directory(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield staging
        out.mkdir(exist_ok=True)
        if replacing:
            (out / LOAD_MARKER).unlink()  # from here on OUT does not load until the new marker is in place
            for old in out.iterdir():
                if old.name not in keep:
                    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        files = sorted(staging.iterdir(), key=lambda path: path.name == LOAD_MARKER)
        for path in files:
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
