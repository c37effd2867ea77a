"""Hostile input and faults for `hf-based convert` / `demo` and `convert()`: each is refused with exit status 1 and one
line on stderr, and leaves nothing lost or half-written (an old model still loads, no model appears, no temp files)."""

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conversion_helpers import LINEAR_TERM_FLAGS, make_tokenizer, make_workdir, records, run, tiny_recipe
from transformers import AutoModelForCausalLM

from hf_based.cli import main
from hf_based.conversion import ConversionError, pipeline
from hf_based.conversion.blockwise import _dump_directory
from hf_based.conversion.linearize import AttentionTransfer
from hf_based.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--window", "8", "--seq-len", "32", "--batch-size", "2", "--grad-accum", "2", "--stage2-lr", "1e-3"]
TINY += ["--stage1-steps", "4", "--stage2-steps", "2", "--checkpoint-every", "2", "--val-records", "40"]
TINY += ["--val-sequences", "2", "--no-progress", *LINEAR_TERM_FLAGS]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = make_workdir(tmp_path_factory.mktemp("hostile"), make_tokenizer())
    (root / "eval").mkdir()
    return root


def argv(workdir, out, *extra, data=None):
    return [
        "convert",
        str(workdir / "teacher"),
        str(out),
        "--data",
        data or str(workdir / "alpaca.json"),
        *TINY,
        *extra,
    ]


def fails(args, capsys, message: str, command: str = "convert") -> str:
    """Run the CLI; it must exit 1 with `message` (a regex) in one line after 'hf-based COMMAND: error:'."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(map(str, args)))
    assert exit_info.value.code == 1, args
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"hf-based {command}: error:") and re.search(message, err), err
    return err


def leftovers(*roots: Path) -> list[Path]:
    """Temporary files of atomic saves and staging directories of model saves."""
    found = []
    for root in roots:
        if root.is_dir():
            found += [p for p in root.rglob("*") if ".tmp" in p.name or ".partial-" in p.name]
    return found


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def assert_model_intact(out: Path, before: dict[str, bytes]) -> None:
    assert snapshot(out) == before
    assert type(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)).__name__ == "BasedForCausalLM"
    assert not leftovers(out, out.parent)


@pytest.fixture(scope="module")
def finished(workdir):
    """A finished conversion made with `argv(workdir, out)`."""
    out = workdir / "finished"
    assert main(argv(workdir, out)) == 0
    return out


@pytest.fixture(scope="module")
def interrupted(workdir):
    """Stage 1 stopped after its checkpoint at step 2 of 4 (a killed run)."""

    def stop(name, step):
        if step == 3:
            raise KeyboardInterrupt

    out = workdir / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run(workdir, out, tiny_recipe(stage1_steps=4, stage2_steps=2), on_step=stop)
    return out


def copy_of(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(source, out)
    return out


# --- options refused before any work --------------------------------------------------------------------------------

BAD_OPTIONS = [
    (["--max-grad-norm", "-1"], r"max_grad_norm=-1\.0 is not supported; accepted: a number > 0"),
    (["--max-grad-norm", "0"], r"max_grad_norm=0\.0 is not supported"),
    (["--val-records", "-1"], r"val_records=-1 is not supported; accepted: integers >= 0"),
    (["--max-records", "0"], r"max_records=0 is not supported; accepted: integers >= 1"),
    (["--window", "32"], r"window=32 >= seq_len=32: .*nothing to learn"),
    (["--window", "64"], r"window=64 >= seq_len=32"),
    (["--lora-dropout", "2"], r"lora_dropout=2\.0 is not supported; accepted: 0 <= value < 1"),
    (["--weight-decay", "-5"], r"weight_decay=-5\.0 is not supported; accepted: a number >= 0"),
    (["--val-sequences", "0"], r"val_sequences=0 is not supported; accepted: integers >= 1"),
    (["--stage1-lr", "nan"], r"stage1_lr=nan is not supported"),
    (["--stage2-lr=-1e-3"], r"stage2_lr=-0\.001 is not supported"),
    (["--mse-factor", "inf"], r"mse_factor=inf is not supported"),
    (["--warmup-steps", "-1"], r"warmup_steps=-1 is not supported"),
    (["--lora-alpha", "0"], r"lora_alpha=0\.0 is not supported"),
    (["--epochs", "0"], r"epochs=0\.0 is not supported"),
    (["--stage2-epochs=-1"], r"stage2_epochs=-1\.0 is not supported; accepted: a number >= 0 \(0: no LoRA\)"),
    (["--window-factor-init", "1"], r"window_factor_init=1\.0 is not supported"),
    (["--linear-factor-init", "1"], r"linear_factor_init=1\.0 is not supported; accepted: none or 0 <= value < 1"),
    (["--sinks", "-2"], r"sinks=-2 is not supported; accepted: integers >= 0"),
    (["--softmax-layers", "copy:0%"], r"softmax_layers='copy:0%' is not supported \(P must be > 0\); accepted: "),
    (["--softmax-layers", "kl:%"], r"softmax_layers='kl:%' is not supported \(P is missing\); accepted: "),
    (["--softmax-layers", "copy:101%"], r"softmax_layers='copy:101%' is not supported \(P must be <= 100\)"),
    (["--lora-targets", ","], r"lora_targets=\(\) is not supported"),
    (["--data", "teacher", "--teacher-sequences", "0"], r"teacher_sequences=0 is not supported"),
    (["--eval-tasks", "piqaa", "--eval-data-dir", "{eval}"], r"unknown eval task\(s\) piqaa; accepted: piqa"),
    (["--eval-tasks", "piqa", "--eval-data-dir", "{eval}-missing"], r"eval_data_dir .*eval-missing is not a dir"),
    (["--eval-tasks", "piqa", "--eval-data-dir", "{eval}", "--eval-limit", "0"], r"eval_limit=0 is not supported"),
    (["--eval-tasks", "piqa", "--eval-data-dir", "{eval}", "--eval-batch-size", "0"], r"eval_batch_size=0 is not"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_option_is_refused_before_any_work(workdir, tmp_path, capsys, extra, message):
    extra = [e.replace("{eval}", str(workdir / "eval")) for e in extra]
    fails(argv(workdir, tmp_path / "out", *extra), capsys, message)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "{out}", "--no-eval", "--lora-dropout", "2"], r"lora_dropout=2\.0"),
        (["demo", "{out}", "--no-eval", "--max-records", "0"], r"max_records=0"),
        (["convert", "--eval-tasks", "", "--weight-decay", "-5"], r"weight_decay=-5\.0"),  # no BASE OUT: the demo
    ],
)
def test_demo_checks_options_before_loading_its_teacher(tmp_path, capsys, monkeypatch, args, message):
    def no_teacher(*_):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr("hf_based.conversion.demo.demo_teacher", no_teacher)
    fails([a.replace("{out}", str(tmp_path / "out")) for a in args], capsys, message, command=args[0])
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(workdir, tmp_path, capsys):
    (tmp_path / "out").write_text("not a directory")
    fails(argv(workdir, tmp_path / "out"), capsys, r"out is a file; OUT must be a directory")


@pytest.mark.parametrize(("field", "value", "shown"), [("output", None, "null"), ("instruction", ["a"], "list")])
def test_record_field_that_is_not_text_is_refused(workdir, tmp_path, capsys, field, value, shown):
    data = records(100)
    data[57][field] = value
    (tmp_path / "data.json").write_text(json.dumps(data))
    message = rf"training record 57: field '{field}' is {shown}; accepted: a string"
    fails(argv(workdir, tmp_path / "out", data=str(tmp_path / "data.json")), capsys, message)
    assert not (tmp_path / "out").exists()


def test_record_field_that_is_a_number_is_refused_by_the_api(workdir, tmp_path):
    data = [{"prompt": "the cat", "completion": 7}] + records(99)
    (tmp_path / "data.json").write_text(json.dumps(data))
    with pytest.raises(ConversionError, match=r"training record 0: field 'completion' is int"):
        run(workdir, tmp_path / "out", tiny_recipe(), data=str(tmp_path / "data.json"), val_records=0)


# --- planted pickles ------------------------------------------------------------------------------------------------


class Planted:
    """Unpickling this creates the file `marker`: what an attacker's code would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize(
    ("planted", "extra"),
    [
        ("stage1.pt", []),
        ("stage2.pt", []),
        ("layer_selection.pt", ["--softmax-layers", "mse:1"]),
        ("teacher_text.pt", ["--teacher-sequences", "8"]),
        ("stage1_block0.pt", ["--blockwise", "2"]),
        ("blockwise/key.pt", ["--blockwise", "2"]),
    ],
)
def test_planted_pickle_is_not_run(workdir, tmp_path, capsys, planted, extra):
    out, marker = tmp_path / "out", tmp_path / "pwned"
    path = out / "checkpoints" / planted
    path.parent.mkdir(parents=True)
    torch.save({"key": {}, "step": 1, "done": True, "model": Planted(marker), "history": []}, path)
    data = "teacher" if planted == "teacher_text.pt" else None  # text the teacher writes, kept in teacher_text.pt
    fails(argv(workdir, out, *extra, data=data), capsys, rf"cannot read {re.escape(str(path))} \(UnpicklingError: ")
    assert not marker.exists() and not (out / "config.json").exists() and not leftovers(out)
    torch.load(path, weights_only=False)  # the file does run code when unpickled
    assert marker.exists()


# --- runs that must not mix -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "setting"),
    [
        (["--stage1-lr", "0.02"], r"stage1_lr \(0\.01 -> 0\.02\)"),
        (["--max-grad-norm", "0.5"], r"max_grad_norm \(1\.0 -> 0\.5\)"),
        (["--lr-schedule", "cosine"], r"lr_schedule \('constant' -> 'cosine'\)"),
        (["--warmup-steps", "1"], r"warmup_steps \(0 -> 1\)"),
        (["--weight-decay", "0.1"], r"weight_decay \(0\.0 -> 0\.1\)"),
        (["--seed", "1"], r"seed \(0 -> 1\)"),
    ],
)
def test_resume_with_other_settings_is_refused(workdir, interrupted, tmp_path, capsys, extra, setting):
    out = copy_of(interrupted, tmp_path)
    checkpoint = (out / "checkpoints" / "stage1.pt").read_bytes()
    fails(argv(workdir, out, *extra), capsys, rf"different settings: .*{setting}.*--no-resume")
    assert (out / "checkpoints" / "stage1.pt").read_bytes() == checkpoint and not (out / "config.json").exists()


def test_resume_on_rewritten_teacher_weights_is_refused(workdir, tmp_path, capsys):
    """The teacher is identified by its weights too: a checkpoint rewritten at the same path is not resumed on."""
    teacher_dir = tmp_path / "teacher"
    shutil.copytree(workdir / "teacher", teacher_dir)

    def stop(name, step):
        if step == 3:
            raise KeyboardInterrupt

    recipe = tiny_recipe(stage1_steps=4)
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(
            str(teacher_dir), tmp_path / "out", recipe, data=str(workdir / "alpaca.json"), val_records=40,
            val_sequences=2, progress=False, on_step=stop,
        )  # fmt: skip
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        teacher.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    teacher.save_pretrained(teacher_dir)
    args = argv(workdir, tmp_path / "out")
    args[1] = str(teacher_dir)
    fails(args, capsys, r"different settings: .*teacher_weights \(")


def test_resume_on_rewritten_data_is_refused(workdir, tmp_path, capsys):
    """The data is identified by its content: a file rewritten at the same path is not resumed on."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records(100)))

    def stop(name, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(workdir, tmp_path / "out", tiny_recipe(stage1_steps=4), data=str(data), on_step=stop)
    data.write_text(json.dumps(records(100, seed=1)))
    fails(argv(workdir, tmp_path / "out", data=str(data)), capsys, r"different settings: data \(")


def test_finished_model_is_not_replaced_by_other_settings(workdir, finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    fails(
        argv(workdir, out, "--stage2-lr", "2e-3"), capsys, r"holds a model converted with other settings \(.*stage2_lr"
    )
    fails(argv(workdir, out, "--dtype", "bfloat16"), capsys, r"other settings \(dtype \('float32' -> 'bfloat16'\)\)")
    fails(argv(workdir, out, "--no-resume"), capsys, r"already holds a model; pass --overwrite to replace it")
    assert_model_intact(out, before)
    with pytest.raises(UsageError, match="other settings"):
        run(workdir, out, tiny_recipe(stage1_steps=4, stage2_steps=3))
    assert snapshot(out) == before


def test_no_resume_with_overwrite_removes_the_old_model_first(workdir, finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    fails(argv(workdir, out, "--no-resume", "--overwrite", "--stage1-lr", "-1"), capsys, "stage1_lr=-1")
    assert (out / "config.json").is_file()  # a refused option changes nothing

    def stop(name, step):
        if step == 3:  # after the checkpoint of step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(workdir, out, tiny_recipe(stage1_steps=4), resume=False, overwrite=True, on_step=stop)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # no stale model beside the new run


# --- unusable results and faults ------------------------------------------------------------------------------------


def test_diverged_stage_is_not_saved_nor_reused(workdir, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    original = AttentionTransfer.loss

    def rising(self, num_layers, factor):
        calls["n"] += torch.is_grad_enabled()
        return original(self, num_layers, factor) * 10.0 ** calls["n"]  # finite, and far worse each step

    monkeypatch.setattr(AttentionTransfer, "loss", rising)
    out = tmp_path / "out"
    fails(argv(workdir, out), capsys, r"stage 1 attention transfer diverged: its final loss .* more than 2x")
    monkeypatch.setattr(AttentionTransfer, "loss", original)
    fails(argv(workdir, out), capsys, r"the finished stage in .*stage1.pt diverged.*--no-resume")
    assert not (out / "config.json").exists() and not leftovers(out)


def test_finished_stage_with_non_finite_parameters_is_not_reused(workdir, finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    path = out / "checkpoints" / "stage1.pt"
    checkpoint = torch.load(path, weights_only=True)
    next(iter(checkpoint["model"].values())).fill_(float("nan"))
    torch.save(checkpoint, path)
    before = snapshot(out)
    fails(argv(workdir, out), capsys, r"the finished stage in .*stage1.pt has non-finite parameters")
    assert snapshot(out) == before


def enospc(path):
    Path(path).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_at_a_checkpoint_leaves_no_temp_file(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda obj, path, *args, **kwargs: enospc(path))
    out = tmp_path / "out"
    fails(argv(workdir, out), capsys, r"No space left on device \(ENOSPC\): .*\.stage1\.pt\.tmp")
    assert not leftovers(out) and not (out / "config.json").exists()


def test_disk_full_in_the_final_save_keeps_the_old_model(workdir, finished, tmp_path, capsys, monkeypatch):
    """An identical rerun saves the model again; when that fails, the old one stays as it was."""
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    monkeypatch.setattr(pipeline, "write_loss_csv", lambda result, path: enospc(path))
    fails(argv(workdir, out), capsys, r"No space left on device \(ENOSPC\): .*loss_stage1\.csv")
    monkeypatch.undo()
    assert_model_intact(out, before)
    assert main(argv(workdir, out)) == 0  # and the same rerun, with space, saves it again


def test_hidden_states_of_another_run_are_not_reused(tmp_path):
    directory = tmp_path / "blockwise"
    directory.mkdir()
    torch.save(torch.ones(2), directory / "hidden_1.pt")  # of unknown origin: no key beside it
    assert _dump_directory(directory, {"seed": 0}) == directory
    assert sorted(p.name for p in directory.iterdir()) == ["key.pt"]
    torch.save(torch.ones(2), directory / "hidden_1.pt")
    _dump_directory(directory, {"seed": 0})  # the same run: kept
    assert sorted(p.name for p in directory.iterdir()) == ["hidden_1.pt", "key.pt"]
    _dump_directory(directory, {"seed": 1})  # another run: deleted
    assert sorted(p.name for p in directory.iterdir()) == ["key.pt"]
    assert torch.load(directory / "key.pt", weights_only=True) == {"seed": 1}
