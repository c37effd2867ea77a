"""`hf-based eval` and hf_based.eval.lm_eval_tasks: lm-eval on local data, on our checkpoints, batched == unbatched."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from hf_based import BasedForCausalLM, preset_config  # noqa: E402
from hf_based.cli import main  # noqa: E402
from hf_based.eval.lm_eval_tasks import (  # noqa: E402
    LOCAL_TASKS,
    UnknownTaskError,
    evaluate,
    format_comparison,
    write_local_tasks,
)
from hf_based.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The shared evaluation data: ../shared next to the checkout, or shared/ inside it.
DATA_CANDIDATES = [REPO.parent / "shared" / "data" / "eval", REPO / "shared" / "data" / "eval"]
DATA = next((path for path in DATA_CANDIDATES if path.is_dir()), None)
needs_data = pytest.mark.skipif(DATA is None, reason="no shared/data/eval next to or inside the checkout")

# Rows of each local file (shared/data/SOURCES.md), i.e. the documents each local task must serve.
DOCS = {
    "piqa": 1838,
    "arc_easy": 570,
    "arc_challenge": 299,
    "hellaswag": 10042,
    "winogrande": 1267,
    "lambada_openai": 5153,
    "wikitext": 62,
}
METRICS = {
    "piqa": {"acc", "acc_norm"},
    "arc_easy": {"acc", "acc_norm"},
    "arc_challenge": {"acc", "acc_norm"},
    "hellaswag": {"acc", "acc_norm"},
    "winogrande": {"acc"},
    "lambada_openai": {"perplexity", "acc"},
    "wikitext": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
    "mmlu": {"acc"},
}
ALL_MIXERS = ["linear_attention", "sliding_window_attention", "base_conv", "hybrid_attention", "full_attention"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    """Random tiny BASED stack (linear, window, conv). A 64-token context (lm-eval truncates prompts from the left
    to the model's max_position_embeddings) keeps the 50k-vocabulary log-softmaxes of every request cheap."""
    torch.manual_seed(0)
    return BasedForCausalLM(preset_config("tiny", max_position_embeddings=64)).eval()


def _checkpoint(out: Path, seed: int) -> Path:
    assert main(["init", str(out), "--preset", "tiny", "--seed", str(seed)]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("tiny-based"), seed=0)


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> Path:
    return write_local_tasks(DATA, tmp_path_factory.mktemp("tasks"))


# ------------------------------------------------------------------------------------------- local task YAMLs


@needs_data
@pytest.mark.slow
def test_local_tasks_serve_the_local_files(local_tasks):
    """Every local task reads the whole local file, with lm-eval's own prompts, and MMLU splits it per subject."""
    manager = TaskManager(include_path=local_tasks, include_defaults=False)
    assert set(LOCAL_TASKS) <= set(manager.all_tasks)
    loaded = manager.load(list(DOCS))["tasks"]
    assert {name: len(task.eval_docs) for name, task in loaded.items()} == DOCS
    for name, task in loaded.items():
        assert task.config.dataset_path == "json", name
        assert Path(task.config.metadata["config_source"]).parent == local_tasks, name
    piqa = json.loads((DATA / "piqa_validation.jsonl").open().readline())
    assert loaded["piqa"].doc_to_text(loaded["piqa"].eval_docs[0]) == f"Question: {piqa['goal']}\nAnswer:"
    hellaswag = loaded["hellaswag"].eval_docs[0]  # lm-eval's hellaswag process_docs ran
    assert hellaswag["query"].startswith("Roof shingle removal: A man is sitting on a roof. He")
    assert hellaswag["gold"] == 3

    mmlu = manager.load(["mmlu"])
    subjects = mmlu["tasks"]
    assert len(subjects) == 57 and set(mmlu["groups"]) == {
        "mmlu",
        "mmlu_stem",
        "mmlu_other",
        "mmlu_social_sciences",
        "mmlu_humanities",
    }
    assert sum(len(task.eval_docs) for task in subjects.values()) == 1531  # mmlu_validation.jsonl
    for name, task in subjects.items():
        subject = name.removeprefix("mmlu_")
        assert {doc["subject"] for doc in task.eval_docs} == {subject}
        assert [doc["subject"] for doc in task.fewshot_docs()] == [subject] * 5  # dev: 5 per subject


@needs_data
@pytest.mark.slow
def test_evaluate_every_local_task(tiny_model, tokenizer):
    # limit=1: one document of each task (one wikitext page), one question of each of MMLU's 57 subjects.
    results = evaluate(tiny_model, list(LOCAL_TASKS), tokenizer=tokenizer, data_dir=DATA, limit=1, batch_size=4)
    assert list(results) == list(LOCAL_TASKS)
    for name, metrics in results.items():
        assert set(metrics) == METRICS[name], name
        for metric, value in metrics.items():
            assert math.isfinite(value), (name, metric)
            assert 0 <= value <= 1 if metric.startswith("acc") else value > 1, (name, metric, value)


# ------------------------------------------------------------------------------------------- padding / batching


@needs_data
def test_batched_equals_unbatched_scores(tiny_model, tokenizer):
    """lm-eval right-pads loglikelihood batches (no attention mask): batch size must not change any score.
    (Rolling loglikelihoods, i.e. wikitext, are compared per request below.)"""
    tasks = ["lambada_openai", "hellaswag"]  # a perplexity, and multiple choice with contexts of varied lengths
    one = evaluate(tiny_model, tasks, tokenizer=tokenizer, data_dir=DATA, limit=5, batch_size=1)
    four = evaluate(tiny_model, tasks, tokenizer=tokenizer, data_dir=DATA, limit=5, batch_size=4)
    assert one.keys() == four.keys() == set(tasks)
    for name in tasks:
        assert one[name].keys() == four[name].keys()
        for metric in one[name]:
            assert four[name][metric] == pytest.approx(one[name][metric], rel=1e-5, abs=1e-6), (name, metric)


def _requests():
    rnd = random.Random(0)
    words = "the cat sat on a mat while seven purple dogs ran over hills and rivers to find it\n".split(" ")

    def text(lo, hi):
        return " ".join(rnd.choices(words, k=rnd.randint(lo, hi)))

    loglikelihood = [Instance("loglikelihood", {}, (text(1, 40), " " + text(1, 6)), i) for i in range(7)]
    rolling = [Instance("loglikelihood_rolling", {}, (text(5, 80),), i) for i in range(2)]
    until = {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False}
    generate = [Instance("generate_until", {}, (text(1, 30), dict(until)), i) for i in range(4)]
    return loglikelihood, rolling, generate


@pytest.mark.parametrize("mixer", [*ALL_MIXERS, "hedgehog"])
def test_lm_eval_padding_does_not_change_scores(mixer, tokenizer):
    """For each mixer, in fp64: lm-eval's right-padded loglikelihood batches (no mask), rolling windows and left-padded
    generate_until batches (with a mask) give what each request gives alone; so does a right-padded masked forward."""
    if mixer == "hedgehog":
        overrides = dict(feature_map="hedgehog", mixer_types=["linear_attention", "hybrid_attention"])
    else:
        overrides = dict(mixer_types=[mixer, mixer])
    torch.manual_seed(0)
    model = BasedForCausalLM(preset_config("tiny", num_hidden_layers=2, max_position_embeddings=48, **overrides))
    model = model.double().eval()
    loglikelihood, rolling, generate = _requests()
    scores, texts = {}, {}
    for batch_size in (1, 4):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
        scores[batch_size] = [ll for ll, _ in lm.loglikelihood(loglikelihood, disable_tqdm=True)]
        scores[batch_size] += lm.loglikelihood_rolling(rolling, disable_tqdm=True)  # 48-token windows
        texts[batch_size] = lm.generate_until(generate, disable_tqdm=True)
    torch.testing.assert_close(torch.tensor(scores[4]), torch.tensor(scores[1]), rtol=1e-12, atol=1e-9)
    assert texts[4] == texts[1]

    ids = [tokenizer(text).input_ids for text in ("a short one", "a somewhat longer sequence of words, padded less")]
    length = max(map(len, ids))
    batch = torch.tensor([seq + [tokenizer.pad_token_id] * (length - len(seq)) for seq in ids])
    mask = torch.tensor([[1] * len(seq) + [0] * (length - len(seq)) for seq in ids])
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        for row, seq in enumerate(ids):
            alone = model(torch.tensor([seq])).logits[0]
            torch.testing.assert_close(padded[row, : len(seq)], alone, rtol=1e-12, atol=1e-10)


# ------------------------------------------------------------------------------------------- lm-eval's own CLI


@needs_data
@pytest.mark.slow
def test_lm_eval_cli_on_our_checkpoint(checkpoint, local_tasks, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` loads our checkpoint through its
    auto_map (a fresh process that never imported hf_based), runs the local tasks via --include_path, and scores
    what evaluate() scores."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={checkpoint},trust_remote_code=True",
        "--tasks",
        "piqa,lambada_openai",
        "--include_path",
        str(local_tasks),
        "--limit",
        "3",
        "--batch_size",
        "2",
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path / "out"),
    ]
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(result_file.read_text())["results"]
    ours = evaluate(str(checkpoint), "piqa,lambada_openai", data_dir=DATA, limit=3, batch_size=2, device="cpu")
    assert theirs["lambada_openai"]["perplexity,none"] == pytest.approx(ours["lambada_openai"]["perplexity"], rel=1e-6)
    assert theirs["piqa"]["acc_norm,none"] == ours["piqa"]["acc_norm"]


# ------------------------------------------------------------------------------------------- hf-based eval


@needs_data
def test_cli_compare_and_output(checkpoint, tmp_path, capsys):
    base = _checkpoint(tmp_path / "base", seed=1)
    output = tmp_path / "report" / "results.json"
    argv = [
        "eval",
        str(checkpoint),
        "--compare",
        str(base),
        "--tasks",
        "lambada_openai,piqa",
        "--data-dir",
        str(DATA),
        "--limit",
        "3",
        "--batch-size",
        "3",
        "--output",
        str(output),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(output.read_text())
    assert report["model"] == str(checkpoint) and report["base"] == str(base) and report["limit"] == 3
    ours, theirs = report["results"], report["base_results"]
    assert set(ours) == set(theirs) == {"lambada_openai", "piqa"}
    assert ours["lambada_openai"]["perplexity"] != theirs["lambada_openai"]["perplexity"]  # different weights
    lines = {tuple(line.split()[:2]): line.split() for line in printed.splitlines()}
    assert lines[("task", "metric")] == ["task", "metric", "model", "base", "delta"]
    row = lines[("lambada_openai", "perplexity")]
    assert float(row[2]) == pytest.approx(ours["lambada_openai"]["perplexity"], abs=1e-4)
    assert float(row[3]) == pytest.approx(theirs["lambada_openai"]["perplexity"], abs=1e-4)
    assert float(row[4]) == pytest.approx(float(row[2]) - float(row[3]), abs=2e-4)


@needs_data
def test_cli_unknown_task_lists_accepted_ones(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(checkpoint), "--tasks", "piqa,boolq", "--data-dir", str(DATA)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "boolq" in err and all(name in err for name in LOCAL_TASKS)
    assert "Traceback" not in err


def test_missing_data_file(tiny_model, tokenizer, tmp_path):
    (tmp_path / "piqa_validation.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n')
    with pytest.raises(FileNotFoundError, match="arc_easy_validation.jsonl"):
        evaluate(tiny_model, "piqa,arc_easy", tokenizer=tokenizer, data_dir=tmp_path, limit=1)
    with pytest.raises(UnknownTaskError, match="nope"):
        evaluate(tiny_model, "nope", tokenizer=tokenizer, data_dir=tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(tiny_model, "piqa", data_dir=tmp_path, limit=1)


def test_format_comparison():
    table = format_comparison(
        {"piqa": {"acc": 0.75, "acc_norm": 0.5}, "wikitext": {"word_perplexity": 20.0}},
        {"piqa": {"acc": 0.5}, "wikitext": {"word_perplexity": 25.5}},
        labels=("converted", "teacher"),
    )
    rows = [line.split() for line in table.splitlines()]
    assert rows[0] == ["task", "metric", "converted", "teacher", "delta"]
    assert rows[2:] == [
        ["piqa", "acc", "0.7500", "0.5000", "+0.2500"],
        ["piqa", "acc_norm", "0.5000", "-", "-"],
        ["wikitext", "word_perplexity", "20.0000", "25.5000", "-5.5000"],
    ]
