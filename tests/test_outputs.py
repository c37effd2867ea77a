"""Model directories are written whole or not at all, and never over a finished model without --overwrite."""

import errno
import os
from pathlib import Path

import pytest

from hf_based.errors import UsageError
from hf_based.outputs import model_directory


def write_model(directory, weights: str) -> None:
    (directory / "model.safetensors").write_text(weights)
    (directory / "config.json").write_text("{}")


def test_writes_into_a_new_directory(tmp_path):
    with model_directory(tmp_path / "out") as staging:
        write_model(staging, "new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left


def test_refuses_a_finished_model_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_model(out, "old")
    with pytest.raises(UsageError, match="already holds a model; pass --overwrite"):
        with model_directory(out) as staging:
            write_model(staging, "new")
    assert (out / "model.safetensors").read_text() == "old"
    with pytest.raises(UsageError, match="is a file"):
        with model_directory(out / "config.json"):
            pass


def test_overwrite_replaces_stale_files_but_keeps_what_it_is_told(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    write_model(out, "old")
    (out / "model.safetensors.index.json").write_text("{}")  # a stale shard index
    with model_directory(out, overwrite=True, keep=("checkpoints",)) as staging:
        write_model(staging, "new")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_text() == "new"


def test_a_directory_that_is_not_a_model_keeps_its_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with model_directory(out) as staging:
        write_model(staging, "new")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]


def test_a_failure_leaves_the_directory_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="disk full"):
        with model_directory(out) as staging:
            write_model(staging, "new")
            raise RuntimeError("disk full")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_move_puts_the_old_model_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    write_model(out, "old")
    real_replace = os.replace

    def failing_replace(src, dst):  # the new weights move in, then the disk fails
        if Path(dst).name == "config.json" and ".partial-" in str(src) and ".previous" not in str(src):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr("hf_based.outputs.os.replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        with model_directory(out, overwrite=True) as staging:
            write_model(staging, "new")
    assert (out / "model.safetensors").read_text() == "old" and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
