"""Hostile input and faults for every command but convert/demo, and for the Python API behind them: each fails in one
line on stderr (exit status 1; argparse's own usage errors exit 2), and leaves nothing lost or half-written."""

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from import_helpers import based_config, based_state, lolcats_checkpoints, write_based, write_llama

from hf_based import BasedForCausalLM, preset_config
from hf_based.cli import main
from hf_based.errors import CheckpointError, UsageError
from hf_based.importers.based import import_based
from hf_based.importers.lolcats import import_lolcats


def disk_full(*args, **kwargs):
    """Stands in for a writer on a full disk."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Untouched inputs: an original BASED checkpoint, a base Llama with LoLCATs .pt files, a converted model."""
    root = tmp_path_factory.mktemp("sources")
    write_based(root / "based", based_config(), based_state(based_config()))
    write_llama(root / "llama")
    lolcats_checkpoints(root)
    assert main(["import-based", str(root / "based"), str(root / "model")]) == 0
    return root


def fingerprint(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def leftovers(parent: Path) -> list[str]:
    """Staging directories of `hf_based.outputs.model_directory` and temporary files of an atomic write."""
    return [path.name for path in parent.iterdir() if path.name.startswith(".") and "partial" in path.name]


def fails(capsys, argv: list[str], expected: list[str], code: int = 1) -> str:
    """Run the CLI, expect exit status `code` and a last stderr line 'hf-based COMMAND: error: ...' with `expected`."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == code, lines
    assert lines[-1].startswith(f"hf-based {argv[0]}: error: "), lines
    assert all(text in lines[-1] for text in expected), lines[-1]
    return lines[-1]


def broken_based(change):
    """A copy of the original BASED checkpoint with `change(directory)` applied."""

    def make(tmp: Path, sources: Path) -> str:
        directory = write_based(tmp / "src", based_config(), based_state(based_config()))
        change(directory)
        return str(directory)

    return make


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _safetensors_garbage(directory: Path) -> None:
    (directory / "pytorch_model.bin").unlink()
    (directory / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not a header")


# import-based SRC variants: (make SRC, texts of the error line).
IMPORT_BASED = {
    "config random bytes": (broken_based(lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00\x81")), ["UTF-8"]),
    "config invalid json": (broken_based(lambda d: (d / "config.json").write_text("{'n_embd': 32")), ["valid JSON"]),
    "config json list": (broken_based(lambda d: (d / "config.json").write_text("[1, 2]")), ["JSON list"]),
    "config n_head 0": (
        broken_based(lambda d: (d / "config.json").write_text(json.dumps(based_config(n_head=0)))),
        ["n_head=0", "integer >= 1"],
    ),
    "config n_layer text": (
        broken_based(lambda d: (d / "config.json").write_text(json.dumps(based_config(n_layer="five")))),
        ["n_layer='five'", "integer >= 1"],
    ),
    "config mixer layers not a list": (
        broken_based(lambda d: (d / "config.json").write_text(json.dumps(based_config(alt_mixer_layers=3)))),
        ["config.json", "TypeError"],
    ),
    "truncated bin": (broken_based(lambda d: _truncate(d / "pytorch_model.bin")), ["pytorch_model.bin", "corrupt"]),
    "empty bin": (broken_based(lambda d: (d / "pytorch_model.bin").write_bytes(b"")), ["pytorch_model.bin"]),
    "corrupt safetensors": (broken_based(_safetensors_garbage), ["model.safetensors", "safetensors"]),
}


@pytest.mark.parametrize("case", IMPORT_BASED)
def test_import_based_bad_source(tmp_path, sources, capsys, case):
    make, expected = IMPORT_BASED[case]
    src = make(tmp_path, sources)
    fails(capsys, ["import-based", src, str(tmp_path / "out")], expected)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def _lolcats_argv(sources: Path, out: Path, distill: str | None = None, *options: str) -> list[str]:
    distill = distill or str(sources / "run_distill.pt")
    return ["import-lolcats", str(sources / "llama"), distill, str(sources / "run_ft.pt"), str(out), *options]


IMPORT_LOLCATS = {
    "distill is a directory": (lambda s, t: _lolcats_argv(s, t / "out", str(s / "llama")), ["is a directory"]),
    "negative lora alpha": (
        lambda s, t: _lolcats_argv(s, t / "out", None, "--lora-alpha", "-16"),
        ["lora_alpha=-16.0", "> 0"],
    ),
    "nan lora alpha": (lambda s, t: _lolcats_argv(s, t / "out", None, "--lora-alpha", "nan"), ["lora_alpha=nan"]),
    "zero window": (lambda s, t: _lolcats_argv(s, t / "out", None, "--window", "0"), ["window=0", ">= 1"]),
    "negative window": (lambda s, t: _lolcats_argv(s, t / "out", None, "--window", "-3"), ["window=-3", ">= 1"]),
}


@pytest.mark.parametrize("case", IMPORT_LOLCATS)
def test_import_lolcats_bad_input(tmp_path, sources, capsys, case):
    argv, expected = IMPORT_LOLCATS[case]
    fails(capsys, argv(sources, tmp_path), expected)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_import_lolcats_truncated_pt(tmp_path, sources, capsys):
    (tmp_path / "run_distill.pt").write_bytes((sources / "run_distill.pt").read_bytes()[:300])
    fails(capsys, _lolcats_argv(sources, tmp_path / "out", str(tmp_path / "run_distill.pt")), ["run_distill.pt"])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- existing models, full disks


@pytest.fixture
def existing_model(tmp_path, sources) -> Path:
    """A finished model in tmp_path/model (a copy of the converted one)."""
    model = tmp_path / "model"
    model.mkdir()
    for path in (sources / "model").iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    return model


def writers(sources: Path, out: Path) -> dict[str, list[str]]:
    return {
        "init": ["init", str(out), "--preset", "tiny"],
        "import-based": ["import-based", str(sources / "based"), str(out)],
        "import-lolcats": _lolcats_argv(sources, out),
    }


@pytest.mark.parametrize("command", ["init", "import-based", "import-lolcats"])
def test_existing_model_is_refused_without_overwrite(existing_model, sources, capsys, command):
    before = fingerprint(existing_model)
    fails(capsys, writers(sources, existing_model)[command], [str(existing_model), "--overwrite"])
    assert fingerprint(existing_model) == before and not leftovers(existing_model.parent)


@pytest.mark.parametrize("command", ["init", "import-based", "import-lolcats"])
def test_full_disk_leaves_the_existing_model(existing_model, sources, capsys, monkeypatch, command):
    before = fingerprint(existing_model)
    monkeypatch.setattr(BasedForCausalLM, "save_pretrained", disk_full)
    fails(capsys, [*writers(sources, existing_model)[command], "--overwrite"], ["(ENOSPC)"])
    assert fingerprint(existing_model) == before and not leftovers(existing_model.parent)
    BasedForCausalLM.from_pretrained(existing_model)


def test_full_disk_leaves_no_model(tmp_path, sources, capsys, monkeypatch):
    monkeypatch.setattr(BasedForCausalLM, "save_pretrained", disk_full)
    fails(capsys, writers(sources, tmp_path / "out")["import-based"], ["No space left on device (ENOSPC)"])
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent(tmp_path, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        fails(capsys, ["init", str(parent / "model"), "--preset", "tiny"], ["(EACCES)", str(parent)])
    finally:
        parent.chmod(0o700)
    assert not list(parent.iterdir())


def test_overwrite_replaces_a_sharded_model_whole(existing_model, sources):
    (existing_model / "model.safetensors.index.json").write_text("{}")  # a stale index would shadow the new weights
    assert main([*writers(sources, existing_model)["import-based"], "--overwrite"]) == 0
    assert not (existing_model / "model.safetensors.index.json").exists() and not leftovers(existing_model.parent)
    BasedForCausalLM.from_pretrained(existing_model)


def test_init_seed_out_of_range(tmp_path, capsys):
    fails(capsys, ["init", str(tmp_path / "m"), "--preset", "tiny", "--seed", str(2**64)], ["--seed", "out of range"])
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------------------- eval


@pytest.fixture
def bad_data(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    return data


EVAL_DATA = {
    "broken line": ('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{"goal": "a", "sol1\n', ["line 2", "JSON"]),
    "not an object": ('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n[1, 2]\n', ["line 2", "JSON list"]),
    "empty file": ("", ["holds no records"]),
    "binary": ("\udcff\udcfe".encode("utf-8", "surrogateescape"), ["line 1"]),
}


@pytest.mark.parametrize("case", EVAL_DATA)
def test_eval_bad_jsonl(sources, bad_data, capsys, case):
    text, expected = EVAL_DATA[case]
    path = bad_data / "piqa_validation.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    fails(
        capsys, ["eval", str(sources / "model"), "--tasks", "piqa", "--data-dir", str(bad_data)], [str(path), *expected]
    )


EVAL_OPTIONS = {
    "unknown device": (["--device", "tpu9"], ["--device 'tpu9'"], 1),
    "zero batch size": (["--batch-size", "0"], ["--batch-size", "'0'"], 2),
    "negative limit": (["--limit", "-1"], ["--limit", "'-1'"], 2),
    "negative few-shot": (["--num-fewshot", "-1"], ["--num-fewshot", "'-1'"], 2),
    "metadata not an object": (["--metadata", "[1]"], ["--metadata", "JSON object"], 2),
}


@pytest.mark.parametrize("case", EVAL_OPTIONS)
def test_eval_bad_options(sources, capsys, case):
    options, expected, code = EVAL_OPTIONS[case]
    fails(capsys, ["eval", str(sources / "model"), "--tasks", "piqa", *options], expected, code)


def test_eval_output_on_a_full_disk_keeps_the_old_file(tmp_path, sources, capsys, monkeypatch):
    output = tmp_path / "results.json"
    output.write_text("old\n")
    monkeypatch.setattr("hf_based.cli.eval.evaluate", lambda *args, **kwargs: {"piqa": {"acc": 0.5}})
    monkeypatch.setattr("hf_based.outputs.os.replace", disk_full)
    argv = ["eval", str(sources / "model"), "--tasks", "piqa", "--output", str(output)]
    fails(capsys, argv, ["(ENOSPC)"])
    assert output.read_text() == "old\n" and not leftovers(tmp_path)


def test_eval_output_that_cannot_be_written_fails_before_evaluating(tmp_path, sources, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr("hf_based.cli.eval.evaluate", lambda *args, **kwargs: pytest.fail("evaluated first"))
    argv = ["eval", str(sources / "model"), "--tasks", "piqa", "--output", str(blocker / "results.json")]
    fails(capsys, argv, ["(EEXIST)"])
    assert blocker.read_text() == "" and not leftovers(tmp_path)


# ----------------------------------------------------------------------------------------------- mqar, bench

PLOT_ONLY = {
    "invalid json": ('{"runs": [', ["not a results.json", "JSONDecodeError"]),
    "json list": ("[1, 2]", ["not a results.json", "JSON list"]),
    "wrong structure": ('{"runs": 3}', ["not a results.json", "KeyError"]),
    "binary": ("\udcff".encode("utf-8", "surrogateescape"), ["not a results.json"]),
}


@pytest.mark.parametrize("command", ["mqar", "bench"])
@pytest.mark.parametrize("case", PLOT_ONLY)
def test_plot_only_on_a_broken_results_file(tmp_path, capsys, command, case):
    text, expected = PLOT_ONLY[case]
    (tmp_path / "results.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    fails(capsys, [command, "--out", str(tmp_path), "--plot-only"], [str(tmp_path / "results.json"), *expected])


OPTIONS = {
    "mqar zero max steps": (["mqar", "--protocol", "tiny", "--max-steps", "0"], ["max_steps must be >= 1, got 0"]),
    "mqar zero batch size": (["mqar", "--protocol", "tiny", "--batch-size", "0"], ["batch_size must be >= 1, got 0"]),
    "mqar zero lr": (["mqar", "--protocol", "tiny", "--lr", "0"], ["lr must be > 0 and finite, got 0.0"]),
    "mqar infinite lr": (["mqar", "--protocol", "tiny", "--lr", "inf"], ["lr must be > 0 and finite, got inf"]),
    "mqar negative time budget": (["mqar", "--protocol", "tiny", "--time-budget", "-5"], ["time_budget_s", "-5.0"]),
    "mqar huge seed": (["mqar", "--protocol", "tiny", "--seed", str(2**63)], ["seed must be an integer from"]),
    "mqar unknown device": (["mqar", "--protocol", "tiny", "--device", "gpu"], ["--device 'gpu'"]),
    "bench zero steps": (["bench", "--tiny", "--steps", "0"], ["steps must be >= 1, got 0"]),
    "bench zero trials": (["bench", "--tiny", "--trials", "0"], ["trials must be >= 1, got 0"]),
    "bench zero prefill batch": (["bench", "--tiny", "--prefill-batch", "0"], ["prefill_batch must be >= 1, got 0"]),
    "bench unknown device": (["bench", "--tiny", "--device", "quantum"], ["--device 'quantum'"]),
}


@pytest.mark.parametrize("case", OPTIONS)
def test_bad_options_fail_before_work(tmp_path, capsys, case):
    argv, expected = OPTIONS[case]
    out = tmp_path / "out"
    fails(capsys, [argv[0], "--out", str(out), *argv[1:]], expected)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- Python API


def test_import_based_api_refuses_an_existing_model(existing_model, sources):
    before = fingerprint(existing_model)
    with pytest.raises(UsageError, match="--overwrite"):
        import_based(str(sources / "based"), existing_model)
    assert fingerprint(existing_model) == before
    import_based(str(sources / "based"), existing_model, overwrite=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"lora_alpha": -16.0}, r"lora_alpha=-16.0 must be a finite number > 0"), ({"window": 0}, r"window=0")],
)
def test_import_lolcats_api_bad_options(tmp_path, sources, options, message):
    with pytest.raises(UsageError, match=message):
        import_lolcats(str(sources / "llama"), str(sources / "run_distill.pt"), None, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_import_api_corrupt_weights_are_checkpoint_errors(tmp_path, sources):
    (tmp_path / "run_distill.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="run_distill.pt"):
        import_lolcats(str(sources / "llama"), str(tmp_path / "run_distill.pt"), None, tmp_path / "out")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BasedForCausalLM(preset_config("tiny", max_position_embeddings=64)).eval()


IDS = torch.ones(2, 5, dtype=torch.long)
MODEL_INPUTS = {
    "no tokens": (dict(input_ids=torch.ones(2, 0, dtype=torch.long)), r"no tokens \(shape \(2, 0\)\)"),
    "short mask": (dict(input_ids=IDS, attention_mask=torch.ones(2, 3)), r"\[2, 0 \+ 5\].*got shape \(2, 3\)"),
    "long mask": (dict(input_ids=IDS, attention_mask=torch.ones(2, 7)), r"\[2, 0 \+ 5\].*got shape \(2, 7\)"),
    "mask batch": (dict(input_ids=IDS, attention_mask=torch.ones(3, 5)), r"got shape \(3, 5\)"),
}


@pytest.mark.parametrize("call", ["forward", "generate"])
@pytest.mark.parametrize("case", MODEL_INPUTS)
def test_model_bad_inputs(model, call, case):
    inputs, message = MODEL_INPUTS[case]
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**inputs) if call == "forward" else model.generate(**inputs, max_new_tokens=2, pad_token_id=0)
