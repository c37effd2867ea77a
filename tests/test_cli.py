"""The `hf-based` command line and the bundled tokenizer."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_based import PRESETS, BasedForCausalLM, preset_config, utils
from hf_based.cli import main
from hf_based.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    assert main(["init", str(out), "--preset", "tiny", "--seed", "0"]) == 0
    return out


def test_load_tokenizer_is_gpt2():
    tokenizer = load_tokenizer()
    assert tokenizer("Hello").input_ids == [15496]
    assert len(tokenizer) == 50257
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 50256
    assert tokenizer.model_max_length == 2048


def test_init_writes_checkpoint(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "based"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM"}
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "configuration_based.py",
        "modeling_based.py",
    ):
        assert (tiny_dir / name).is_file(), name
    assert load_tokenizer(str(tiny_dir))("Hello").input_ids == [15496]


def test_init_reloads_with_remote_code(tiny_dir):
    torch.manual_seed(0)  # same seed and preset as the CLI: the same weights
    expected = BasedForCausalLM(preset_config("tiny")).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=True).eval()
    ids = load_tokenizer()("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits, rtol=0, atol=0)


def test_init_dtype(tmp_path):
    main(["init", str(tmp_path), "--preset", "tiny", "--dtype", "bfloat16"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16


def test_unknown_preset_exits_with_accepted_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["init", str(tmp_path), "--preset", "based-7b"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "based-7b" in err and all(name in err for name in PRESETS)


def test_tokenizer_larger_than_vocab_errors(tmp_path, capsys):
    tokenizer = load_tokenizer()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(preset_config("tiny").vocab_size - len(tokenizer) + 1)])
    tokenizer.save_pretrained(tmp_path / "big-tokenizer")
    with pytest.raises(SystemExit) as exit_info:
        main(["init", str(tmp_path / "model"), "--preset", "tiny", "--tokenizer", str(tmp_path / "big-tokenizer")])
    assert exit_info.value.code != 0
    assert "vocab_size" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "hf_based", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "init" in result.stdout


def test_console_script_help():
    script = Path(sys.executable).with_name("hf-based")
    if not script.exists():
        pytest.skip("hf-based is not installed in this environment (pip install -e .)")
    result = subprocess.run([str(script), "init", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--preset" in result.stdout


# The console script's module, then argv; prints whether torch was imported once the command exits (atexit).
TORCH_AT_EXIT = (
    "import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
    "import hf_based_launcher; sys.argv = ['hf-based', *sys.argv[1:]]; sys.exit(hf_based_launcher.main())"
)


@pytest.mark.parametrize(
    "command", [None, "init", "import-based", "import-lolcats", "eval", "convert", "demo", "mqar", "bench"]
)
def test_help_and_usage_errors_do_not_import_torch(command):
    """`hf-based [COMMAND] --help` and a bad argument answer without importing torch (seconds on a small machine)."""
    for argv in ([command, "--help"], [command, "--no-such-option"]):
        argv = [a for a in argv if a is not None]
        result = subprocess.run([sys.executable, "-c", TORCH_AT_EXIT, *argv], capture_output=True, text=True)
        assert result.returncode in (0, 2), result.stderr
        assert "torch imported: False" in result.stdout, (argv, result.stdout[-300:])


def test_the_console_script_still_imports_torch_to_run_a_command(tmp_path):
    """The check above can fail: a command that runs imports torch (and registers the model type)."""
    result = subprocess.run(
        [sys.executable, "-c", TORCH_AT_EXIT, "init", str(tmp_path / "tiny"), "--preset", "tiny"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "torch imported: True" in result.stdout


def test_import_hf_based_registers_the_model_type():
    """Outside the command line, `import hf_based` alone lets the Auto classes load our checkpoints."""
    code = (
        "import hf_based; from transformers import AutoConfig, AutoModelForCausalLM; "
        "config = AutoConfig.for_model('based', **hf_based.PRESETS['tiny']); "
        "print(type(AutoModelForCausalLM.from_config(config)).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "BasedForCausalLM", result.stderr[-500:]


def test_os_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "model"  # a path below a file: the OS refuses to make its parent directory
    with pytest.raises(SystemExit) as exit_info:
        main(["init", str(out), "--preset", "tiny"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-based init: error: ") and "(EEXIST)" in err[0], err
    with pytest.raises(FileExistsError):
        main(["--debug", "init", str(out), "--preset", "tiny"])
    monkeypatch.setenv("HF_BASED_DEBUG", "1")
    with pytest.raises(FileExistsError):
        main(["init", str(out), "--preset", "tiny"])


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["init", "out", "--preset", "tiny", "--dtype", "float8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-based init: error: argument --dtype: invalid choice: 'float8'"), err


@pytest.mark.parametrize(
    ("busy", "usable", "cores", "threads"),
    [(0.0, 2, 2, 2), (1.2, 2, 2, 1), (7.0, 4, 4, 1), (1.4, 4, 4, 3), (0, 2, 8, 2)],
)
def test_free_cpu_threads_leave_the_busy_cores(monkeypatch, busy, usable, cores, threads):
    monkeypatch.setattr(utils, "busy_cores", lambda: busy)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(usable)))
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert utils.free_cpu_threads() == threads


def test_busy_cores_sees_a_busy_process():
    """A process spinning on one core: the measured busy cores rise by about one (the rest of the machine may add)."""
    idle = utils.busy_cores(0.3)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = utils.busy_cores(0.5)
    finally:
        spinner.kill()
    assert 0 <= idle <= (os.cpu_count() or 1)
    assert busy >= 0.7


def test_commands_set_threads_unless_omp_num_threads_is_set(tiny_dir, monkeypatch):
    monkeypatch.setattr(utils, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        main(["init", str(tiny_dir / "a"), "--preset", "tiny"])
        assert torch.get_num_threads() == 3
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        main(["init", str(tiny_dir / "b"), "--preset", "tiny"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
