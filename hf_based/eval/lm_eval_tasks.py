"""lm-eval (EleutherAI's lm-evaluation-harness) for hf-based models and any other Hugging Face causal LM.

`evaluate()` wraps `lm_eval.simple_evaluate` and returns `{task: {metric: value}}`. With `data_dir`, the standard
tasks in `LOCAL_TASKS` read local JSONL in the hub schema (e.g. the repository's shared/data/eval) instead of the
hub: the YAML templates in `hf_based/eval/tasks/` include lm-eval's own task YAMLs (prompts, choices, metrics,
process functions) and override only the dataset fields, so task names and scores are those of the standard
tasks. `write_local_tasks()` renders them for a data directory into a folder that lm-eval takes as an include
path, for `evaluate()` and equally for `lm_eval --include_path DIR` on the command line.

The synthetic retrieval tasks of `hf_based.eval.retrieval` (passkey, niah_*, kv_lookup, copy and their group
`retrieval`) are always available; `evaluate()` sizes their prompts with the evaluated model's own tokenizer.

Recurrent models need nothing special here: lm-eval right-pads loglikelihood batches and calls the model without
an attention mask, and a causal model's outputs at the real positions do not depend on padding after them.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import shutil
import string
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_based.errors import UnknownTaskError, UsageError
from hf_based.eval import retrieval
from hf_based.utils import torch_dtype

if TYPE_CHECKING:  # torch is imported where used: the command line lists the task names without it
    import datasets
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TEMPLATES = Path(__file__).with_name("tasks")

RETRIEVAL_NAMES = (*retrieval.TASKS, "retrieval")

# The standard tasks that `data_dir` serves locally (their mmlu_* subjects and categories come with `mmlu`).
LOCAL_TASKS = (
    "piqa",
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "winogrande",
    "lambada_openai",
    "wikitext",
    "mmlu",
)


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        import lm_eval.tasks
    except ImportError as error:
        raise ImportError("hf-based eval needs lm-eval: pip install 'hf-based[eval]'") from error
    return lm_eval


def _yaml_quoted(value: str) -> str:
    """`value` escaped for the inside of a double-quoted YAML scalar (the templates quote every placeholder)."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _render(template: Path, out: Path, **values: str) -> None:
    text = string.Template(template.read_text()).substitute({k: _yaml_quoted(v) for k, v in values.items()})
    out.write_text(text)


def split_tasks(tasks: str | Iterable[str]) -> list[str]:
    """'piqa, arc_easy' or ['piqa', 'arc_easy'] -> ['piqa', 'arc_easy'] (order kept, duplicates dropped)."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return list(dict.fromkeys(name.strip() for name in names if name.strip()))


def write_local_tasks(data_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the local-data versions of `LOCAL_TASKS`, reading `data_dir`, as lm-eval task YAMLs into `out_dir`.

    `out_dir` is then an lm-eval include path: `TaskManager(include_path=out_dir)` in Python, or
    `lm_eval --include_path OUT_DIR --tasks piqa,...` on the command line, where its tasks replace the hub ones
    of the same name. The retrieval tasks come along (in OUT_DIR/retrieval). Files are checked when a task loads,
    not here. Returns `out_dir`.
    """
    lm_eval = _import_lm_eval()
    lm_eval_tasks = Path(lm_eval.tasks.__file__).resolve().parent
    data_dir, out_dir = Path(data_dir).expanduser().resolve(), Path(out_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(lm_eval_tasks=lm_eval_tasks.as_posix(), data_dir=data_dir.as_posix())
    for template in sorted(TEMPLATES.glob("*.yaml")):
        _render(template, out_dir / template.name, **paths)
    # MMLU: one task per subject and the groups that aggregate them, mirroring lm-eval's mmlu/default.
    mmlu_out = out_dir / "mmlu"
    mmlu_out.mkdir(exist_ok=True)
    for upstream in sorted((lm_eval_tasks / "mmlu" / "default").glob("*.yaml")):
        kind = "group" if upstream.name.startswith("_") else "subject"
        _render(TEMPLATES / "mmlu" / f"{kind}.yaml", mmlu_out / upstream.name, name=upstream.stem, **paths)
    shutil.copytree(retrieval.TASK_DIR, out_dir / "retrieval", dirs_exist_ok=True)
    return out_dir


def mmlu_subject_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """process_docs of the local MMLU subject tasks: the questions of the subject named by the dataset's config.

    The local files hold all subjects with a `subject` field; each subject task loads them with its
    `dataset_name` (the subject, as on the hub) as the json builder's config name.
    """
    subject = dataset.info.config_name
    if subject not in set(dataset.unique("subject")):
        raise ValueError(f"no MMLU questions with subject {subject!r} (the config name) in this split")
    return dataset.filter(lambda doc: doc["subject"] == subject)


def _data_files(task_dir: Path, names: list[str]) -> list[Path]:
    """The data files that the rendered tasks `names` read."""
    import yaml

    class Loader(yaml.SafeLoader):  # reads the rendered YAML's own keys; `!function` values are not needed
        pass

    Loader.add_constructor("!function", lambda loader, node: None)
    yaml_of = {name: task_dir / f"{name}.yaml" for name in names if name in LOCAL_TASKS and name != "mmlu"}
    if any(name == "mmlu" or name.startswith("mmlu_") for name in names):
        yaml_of["mmlu"] = next((task_dir / "mmlu").glob("mmlu_*.yaml"))
    files = set()
    for path in yaml_of.values():
        config = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (a SafeLoader)
        files |= {Path(f) for f in config["dataset_kwargs"]["data_files"].values()}
    return sorted(files)


def check_jsonl(path: Path) -> None:
    """UsageError naming the file and line for JSONL that the datasets loader would fail on deep inside: a line that
    is not a JSON object, or a file without any record."""
    records, number = 0, 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise UsageError(
                        f"{path} line {number} is a JSON {type(record).__name__}; accepted: one object per line"
                    )
                records += 1
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} line {number} is not valid JSON: {error}") from error
    except (gzip.BadGzipFile, EOFError) as error:
        raise UsageError(f"{path} is not a readable gzip file (truncated or corrupt?): {error}") from error
    if not records:
        raise UsageError(f"{path} holds no records; accepted: one JSON object per line")


def _metrics(task_results: Mapping[str, Any]) -> dict[str, float]:
    """lm-eval's {'acc,none': 0.5, 'acc_stderr,none': 'N/A', 'alias': ...} -> {'acc': 0.5}."""
    metrics = {}
    for key, value in task_results.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or "_stderr" in metric or isinstance(value, (str, bool)):
            continue
        if isinstance(value, (int, float)):
            metrics[metric if filter_name == "none" else f"{metric},{filter_name}"] = float(value)
    return metrics


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _make_lm(model, tokenizer, batch_size, device, dtype):
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, (str, Path)):
        return HFLM(
            pretrained=str(model),
            backend="causal",
            tokenizer=tokenizer,
            batch_size=batch_size,
            device=device or _default_device(),
            dtype=dtype if dtype is not None else "auto",
            trust_remote_code=True,
        )
    if tokenizer is None:
        raise ValueError("evaluate() needs a tokenizer for an already-loaded model")
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=None if dtype is None else torch_dtype(dtype))
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")


def evaluate(
    model: str | Path | PreTrainedModel,
    tasks: str | Iterable[str],
    *,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    data_dir: str | Path | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    metadata: Mapping[str, Any] | None = None,
    by_depth: bool = False,
) -> dict[str, dict[str, float]]:
    """Score a causal LM on lm-eval tasks; returns {task: {metric: value}}, e.g. {'piqa': {'acc': .., 'acc_norm': ..}}.

    model: a checkpoint directory or hub id (loaded with trust_remote_code=True, in `dtype`, default: the
        checkpoint's), or an already-loaded `PreTrainedModel`, then with its `tokenizer` (moved to `device` /
        `dtype` only when they are given, and put in eval mode).
    tasks: names, as a list or comma-separated. With `data_dir`, the tasks in `LOCAL_TASKS` (and mmlu_* subjects
        and categories) read local JSONL in the hub schema from `data_dir`; without it, lm-eval's hub tasks.
    limit: documents per task (an int), or a fraction of them (a float < 1); None: all.
    batch_size, num_fewshot: as in lm-eval (num_fewshot None: each task's default).
    device: default cuda if available, else cpu.
    metadata: lm-eval task metadata, e.g. the retrieval tasks' {"max_seq_lengths": [256, 512], "num_samples": 2,
        "depths": [0, 50, 100], "seed": 0}; bad retrieval settings raise UsageError (a ValueError) naming them.

    by_depth: the retrieval tasks also report each length at each needle depth, as "LENGTH@DEPTH" (e.g. "256@50"),
        from the per-document scores.
    Metric names drop lm-eval's ',none' filter suffix; standard errors are not computed. Unknown task names raise
    UnknownTaskError (a ValueError); missing data files FileNotFoundError; a data file with a line that is not a JSON
    object, or without records, UsageError.
    """
    _import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = split_tasks(tasks)
    if not names:
        raise UnknownTaskError("no tasks given")
    retrieval.settings(metadata)  # bad retrieval settings fail here, before a model loads
    # The retrieval tasks size prompts with the evaluated model's tokenizer, registered under this name below.
    tokenizer_name = f"evaluate-{uuid.uuid4().hex}"
    metadata = {**(metadata or {}), "registered_tokenizer": tokenizer_name}
    with tempfile.TemporaryDirectory(prefix="hf-based-tasks-") as task_dir:
        if data_dir is not None:
            write_local_tasks(data_dir, task_dir)
            # The local tasks only: lm-eval's own task index takes seconds to build and is not needed.
            task_manager = TaskManager(include_path=task_dir, include_defaults=False, metadata=metadata)
            unknown = [name for name in names if name not in task_manager.all_tasks]
            if unknown:
                raise UnknownTaskError(
                    f"unknown task(s) {', '.join(unknown)} with a data directory; accepted: "
                    f"{', '.join(LOCAL_TASKS)} (and mmlu_* subjects and categories), {', '.join(RETRIEVAL_NAMES)}"
                )
            files = _data_files(Path(task_dir), names)
            missing = [path.name for path in files if not path.is_file()]
            if missing:
                raise FileNotFoundError(f"missing data file(s) in {data_dir}: {', '.join(missing)}")
            for path in files:
                check_jsonl(path)
        else:
            # lm-eval's own task index takes seconds to build: only when a task needs it.
            task_manager = TaskManager(
                include_path=retrieval.TASK_DIR.as_posix(),
                include_defaults=not set(names) <= set(RETRIEVAL_NAMES),
                metadata=metadata,
            )
            unknown = [name for name in names if name not in task_manager.all_tasks and not Path(name).is_file()]
            if unknown:
                raise UnknownTaskError(f"unknown lm-eval task(s) {', '.join(unknown)} (`lm_eval ls tasks` lists them)")
        lm = _make_lm(model, tokenizer, batch_size, device, dtype)
        with retrieval.registered_tokenizer(tokenizer_name, lm.tokenizer):
            output = simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=task_manager,
                bootstrap_iters=0,
                log_samples=by_depth,
            )
    if output is None:  # a non-zero rank of a distributed run
        return {}
    # Requested tasks and groups; a tag (e.g. ai2_arc) stands for its tasks, which then appear by name.
    results = output["results"]
    members = {task for tasks_of_group in output.get("group_subtasks", {}).values() for task in tasks_of_group}
    top_level = [name for name in names if name in results] + [name for name in results if name not in members]
    scores = {name: _metrics(results[name]) for name in dict.fromkeys(top_level)}
    for name, samples in output.get("samples", {}).items():
        if name in scores and name in retrieval.TASKS:
            scores[name].update(_by_depth(samples))
    return scores


def _by_depth(samples: list[Mapping[str, Any]]) -> dict[str, float]:
    """A retrieval task's logged documents -> {"LENGTH@DEPTH": mean score}, lengths then depths ascending."""
    scores = {}
    for sample in samples:
        length, depth = sample["doc"]["length"], sample["doc"]["depth"]
        scores.setdefault((length, depth), []).append(float(sample[str(length)]))
    return {f"{length}@{depth}": sum(v) / len(v) for (length, depth), v in sorted(scores.items())}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    # Task and metric names left-aligned, numbers right-aligned.
    def line(row):
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_results(results: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table of `evaluate()` results: task, metric, value."""
    rows = [[task, metric, _fmt(value)] for task, metrics in results.items() for metric, value in metrics.items()]
    return _table(["task", "metric", "value"], rows)


def format_comparison(
    results: Mapping[str, Mapping[str, float]],
    base_results: Mapping[str, Mapping[str, float]],
    *,
    labels: tuple[str, str] = ("model", "base"),
) -> str:
    """A plain-text table of two `evaluate()` results side by side: task, metric, model, base, delta = model - base.

    Rows follow `results` then anything only in `base_results`; a value missing on one side shows as '-'.
    """
    rows = []
    tasks = list(dict.fromkeys([*results, *base_results]))
    for task in tasks:
        ours, base = results.get(task, {}), base_results.get(task, {})
        for metric in dict.fromkeys([*ours, *base]):
            a, b = ours.get(metric), base.get(metric)
            delta = None if a is None or b is None else a - b
            rows.append([task, metric, _fmt(a), _fmt(b), "-" if delta is None else re.sub(r"^(?!-)", "+", _fmt(delta))])
    return _table(["task", "metric", *labels, "delta"], rows)


__all__ = [
    "LOCAL_TASKS",
    "RETRIEVAL_NAMES",
    "UnknownTaskError",
    "evaluate",
    "format_comparison",
    "format_results",
    "mmlu_subject_docs",
    "split_tasks",
    "write_local_tasks",
]
