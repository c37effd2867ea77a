"""Writing outputs so that they are never half-written. A file goes to a temporary file beside it and is renamed into
place; a model directory goes to a temporary directory beside OUT and its files are moved in when all of them exist,
`config.json` last, since a directory without it does not load as a model."""

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hf_based.errors import UsageError

LOAD_MARKER = "config.json"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)`, then rename the temporary file to `path`: a failure (a full disk, ...) leaves the old file
    (or none), never a truncated one, and removes the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.partial")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the original error is the one to report
            temporary.unlink(missing_ok=True)
        raise


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

    When OUT holds a model, its files make way for the new ones (a sharded checkpoint's stale index included), except
    the names in `keep` (e.g. a conversion's resumable checkpoints); other directories keep what they hold. The old
    files are set aside until the new ones are all in place, and put back if moving them in fails.
    """
    out = check_output_directory(out, overwrite)
    replacing = is_model_directory(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    previous = staging / ".previous"  # the old model's files while the new ones move in
    try:
        yield staging
        out.mkdir(exist_ok=True)
        files = sorted(staging.iterdir(), key=lambda path: path.name == LOAD_MARKER)
        if replacing:
            previous.mkdir()
            # The marker first: from here on OUT does not load until the new marker is in place.
            old = sorted((p for p in out.iterdir() if p.name not in keep), key=lambda p: p.name != LOAD_MARKER)
            for path in old:
                os.replace(path, previous / path.name)
        try:
            for path in files:
                os.replace(path, out / path.name)
        except BaseException:
            for path in files:
                (out / path.name).unlink(missing_ok=True)
            if replacing:
                for path in sorted(previous.iterdir(), key=lambda p: p.name == LOAD_MARKER):
                    os.replace(path, out / path.name)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
