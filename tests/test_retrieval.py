"""hf_based.eval.retrieval: generated retrieval tasks (passkey, needles, key-value lookup, copy) sized in the
model's tokens, scored per prompt length, run through `evaluate()` and `hf-based eval`."""

import json
import re

import pytest
import torch

pytest.importorskip("lm_eval")

from hf_based import BasedForCausalLM, preset_config  # noqa: E402
from hf_based.cli import main  # noqa: E402
from hf_based.errors import UsageError  # noqa: E402
from hf_based.eval import retrieval  # noqa: E402
from hf_based.eval.lm_eval_tasks import evaluate  # noqa: E402
from hf_based.tokenizer import load_tokenizer  # noqa: E402

FAST = {"max_seq_lengths": [256], "num_samples": 1, "depths": [50]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return BasedForCausalLM(preset_config("tiny")).eval()


def yaml_text(name: str) -> str:
    return (retrieval.TASK_DIR / f"{name}.yaml").read_text()


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


@pytest.mark.parametrize("task", retrieval.TASKS)
def test_generators_are_deterministic_per_seed(tokenizer, task):
    generate = retrieval.GENERATORS[task]
    doc = generate(tokenizer, 256, 50, 0)
    assert doc == generate(tokenizer, 256, 50, 0)
    assert doc["input"] != generate(tokenizer, 256, 50, 1)["input"]
    assert doc["outputs"] != generate(tokenizer, 256, 50, 1)["outputs"]
    assert (doc["length"], doc["depth"]) == (256, 50)


@pytest.mark.parametrize("task", retrieval.TASKS)
@pytest.mark.parametrize("length", [256, 1024])
def test_prompt_fills_the_length_less_the_answer_without_passing_it(tokenizer, task, length):
    # Filler is cut after a whole sentence (copy's passage at a word); kv_lookup's unit is a whole "key": "value" line.
    slack = {"kv_lookup": 24, "copy": 4}.get(task, 16)
    budget = retrieval.prompt_budget(task, length)
    for depth in retrieval.DEFAULT_DEPTHS:
        doc = retrieval.GENERATORS[task](tokenizer, length, depth, 0)
        assert doc["prompt_tokens"] == retrieval.count_tokens(tokenizer, doc["input"])
        assert budget - slack <= doc["prompt_tokens"] <= budget, (depth, doc["prompt_tokens"])


@pytest.mark.parametrize("task", retrieval.TASKS)
def test_answer_budget_is_the_tasks_max_gen_toks(task):
    # Prompt + answer fit the length only if the budget left is what lm-eval generates.
    yaml = yaml_text(task)
    common = yaml_text("_common")
    max_gen_toks = int(re.search(r"max_gen_toks: (\d+)", yaml if "max_gen_toks" in yaml else common).group(1))
    assert retrieval.prompt_budget(task, 1000) == 1000 - max_gen_toks


def haystack_fraction(tokenizer, prompt: str, start: int, end: int) -> float:
    """Where the needle prompt[start:end] lies in the filler between the header (up to the first blank line) and the
    question (after the last), in tokens."""
    begin, stop = prompt.index("\n\n") + 2, prompt.rindex("\n\n")
    filler = n_tokens(tokenizer, prompt[begin:stop]) - n_tokens(tokenizer, prompt[start:end])
    return n_tokens(tokenizer, prompt[begin:start]) / filler


@pytest.mark.parametrize("task", ["passkey", "niah_single"])
@pytest.mark.parametrize("length", [256, 2048])
@pytest.mark.parametrize("depth", retrieval.DEFAULT_DEPTHS)
def test_needle_once_at_its_depth(tokenizer, task, length, depth):
    doc = retrieval.GENERATORS[task](tokenizer, length, depth, 3)
    prompt, answer = doc["input"], doc["outputs"][0]
    needle = f"The pass key is {answer}." if task == "passkey" else f"is: {answer}."
    assert prompt.count(needle) == 1
    assert prompt.count(answer) == (2 if task == "passkey" else 1)
    start = prompt.index(needle) if task == "passkey" else prompt.rindex("One of", 0, prompt.index(needle))
    # Needles go between sentences, and the header and question take a share: looser at 256 tokens.
    tolerance = 0.08 if length == 256 else 0.03
    end = prompt.index(needle) + len(needle)
    assert haystack_fraction(tokenizer, prompt, start, end) == pytest.approx(depth / 100, abs=tolerance)


@pytest.mark.parametrize("depth", retrieval.DEFAULT_DEPTHS)
def test_kv_lookup_asks_the_pair_at_its_depth(tokenizer, depth):
    doc = retrieval.kv_lookup_doc(tokenizer, 1024, depth, 0)
    prompt, value = doc["input"], doc["outputs"][0]
    key = prompt.rsplit('"', 3)[-3]
    lines = [line for line in prompt.splitlines() if line.startswith('  "')]
    assert prompt.count(value) == 1 and prompt.count(f'"{key}": "{value}"') == 1
    assert prompt.count(key) == 3  # its line and twice in the question
    asked = next(i for i, line in enumerate(lines) if key in line)
    assert asked / (len(lines) - 1) == pytest.approx(depth / 100, abs=0.01)


@pytest.mark.parametrize("depth", retrieval.DEFAULT_DEPTHS)
def test_copy_quotes_a_unique_span_at_its_depth(tokenizer, depth):
    doc = retrieval.copy_doc(tokenizer, 1024, depth, 0)
    prompt, answer = doc["input"], doc["outputs"][0]
    passage, cue = prompt.split("\n\n")[1], prompt.rsplit("Repeat: ", 1)[1]
    assert passage.count(cue) == 1 and f"{cue} {answer}" in passage
    assert len(answer.split()) == retrieval.COPY_ANSWER_WORDS
    if depth == 0:
        assert passage.startswith(cue)
    fraction = len(passage[: passage.index(cue)].split()) / len(passage.split())
    assert fraction == pytest.approx(depth / 100, abs=0.05)


def test_scores_match_the_answer_exactly(tokenizer):
    doc = retrieval.passkey_doc(tokenizer, 512, 25, 0)
    key = doc["outputs"][0]
    assert retrieval.process_results(doc, [f" {key}. The"]) == {"512": 1.0}
    assert retrieval.process_results(doc, [f" {key[:-1]}"]) == {"512": 0.0}
    values = retrieval.niah_multivalue_doc(tokenizer, 256, 0, 0)["outputs"]
    assert retrieval.process_results({"length": 256, "outputs": values}, [" and ".join(values[:2])]) == {"256": 0.5}
    doc = retrieval.copy_doc(tokenizer, 256, 0, 0)
    answer = doc["outputs"][0]
    assert retrieval.process_copy_results(doc, [f" {answer} and more"]) == {"256": 1.0}
    assert retrieval.process_copy_results(doc, [" " + answer.rsplit(" ", 1)[0]]) == {"256": 0.0}


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"max_seq_lengths": [256, 0]}, "max_seq_lengths: 0 is not accepted; accepted: 256, 512, 1024"),
        ({"max_seq_lengths": 300}, "max_seq_lengths: 300 is not accepted; accepted: 256"),
        ({"num_samples": -1}, "num_samples: -1 is not accepted; accepted: a positive integer"),
        ({"depths": [50, 101]}, "depths: 101 is not accepted; accepted: percents 0 to 100"),
    ],
)
def test_bad_metadata_is_named(tiny_model, tokenizer, metadata, message):
    with pytest.raises(UsageError, match=message):
        retrieval.settings(metadata)
    with pytest.raises(UsageError, match=message):  # before any document or model runs
        evaluate(tiny_model, "passkey", tokenizer=tokenizer, metadata=metadata)


def test_tokenizer_comes_from_metadata(tokenizer):
    with retrieval.registered_tokenizer("mine", tokenizer):
        assert retrieval.tokenizer_from_metadata({"registered_tokenizer": "mine"}) is tokenizer
    with pytest.raises(UsageError, match="pretrained"):
        retrieval.tokenizer_from_metadata({"registered_tokenizer": "mine"})


def test_every_task_through_evaluate(tiny_model, tokenizer):
    results = evaluate(tiny_model, retrieval.TASKS, tokenizer=tokenizer, metadata=FAST)
    assert set(results) == set(retrieval.TASKS)
    for task, metrics in results.items():
        assert set(metrics) == {"256"} and 0 <= metrics["256"] <= 1, task


def test_scores_by_depth_average_to_the_length_score(tiny_model, tokenizer):
    metadata = {"max_seq_lengths": [256, 512], "num_samples": 1, "depths": [0, 50, 100]}
    metrics = evaluate(tiny_model, "kv_lookup", tokenizer=tokenizer, metadata=metadata, by_depth=True)["kv_lookup"]
    cells = {f"{n}@{d}" for n in (256, 512) for d in (0, 50, 100)}
    assert set(metrics) == {"256", "512"} | cells
    for n in (256, 512):
        assert metrics[str(n)] == pytest.approx(sum(metrics[f"{n}@{d}"] for d in (0, 50, 100)) / 3)
    assert set(evaluate(tiny_model, "kv_lookup", tokenizer=tokenizer, metadata=FAST)["kv_lookup"]) == {"256"}


def test_cli_plots_retrieval_by_length_and_depth(tmp_path, capsys):
    assert main(["init", str(tmp_path / "model"), "--preset", "tiny", "--seed", "0"]) == 0
    assert main(["init", str(tmp_path / "base"), "--preset", "tiny", "--seed", "1"]) == 0
    metadata = json.dumps({"max_seq_lengths": [256], "num_samples": 1, "depths": [0, 100]})
    argv = ["eval", str(tmp_path / "model"), "--tasks", "passkey,copy", "--metadata", metadata]
    assert main([*argv, "--compare", str(tmp_path / "base"), "--plot", str(tmp_path / "plots" / "r.png")]) == 0
    assert (tmp_path / "plots" / "r.png").read_bytes().startswith(b"\x89PNG")
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[1] for row in rows if row[:1] == ["copy"]] == ["256", "256@0", "256@100"]


def test_cli_plot_needs_a_retrieval_task(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path), "--tasks", "piqa", "--plot", str(tmp_path / "r.png")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "--plot" in err and "passkey" in err and "\n" not in err


def test_cli_prints_a_metric_per_length(tmp_path, capsys):
    assert main(["init", str(tmp_path / "model"), "--preset", "tiny", "--seed", "0"]) == 0
    metadata = {"max_seq_lengths": [256, 512], "num_samples": 1, "depths": [0]}
    argv = ["eval", str(tmp_path / "model"), "--tasks", "passkey", "--metadata", json.dumps(metadata)]
    assert main([*argv, "--output", str(tmp_path / "results.json")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[:2] for row in rows if row[0] == "passkey"] == [["passkey", "256"], ["passkey", "512"]]
    assert json.loads((tmp_path / "results.json").read_text())["metadata"] == metadata


def test_cli_bad_metadata_is_one_line(tmp_path, capsys):
    assert main(["init", str(tmp_path / "model"), "--preset", "tiny", "--seed", "0"]) == 0
    capsys.readouterr()  # init's progress output
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "model"), "--tasks", "copy", "--metadata", '{"num_samples": 0}'])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "num_samples: 0" in err and "positive integer" in err and "\n" not in err
