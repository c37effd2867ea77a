"""What a conversion is given besides its recipe: the training data (`DataOptions`) and the lm-eval scoring
(`EvalOptions`), and the checks of all three before any work starts. Imports no torch: the command line takes its
defaults from here."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hf_based.conversion.recipe import Recipe, is_int, is_number
from hf_based.errors import ConversionError
from hf_based.eval.lm_eval_tasks import LOCAL_TASKS, RETRIEVAL_NAMES, split_tasks

TEACHER_DATA = "teacher"  # data source: let the teacher generate its own training text


def looks_like_path(source) -> bool:
    path = Path(source).expanduser()
    return bool(path.suffix) or path.is_absolute() or str(source).startswith(".")


def check_sources(sources: Sequence[str | Path]) -> None:
    """Fail fast on local data paths that do not exist (before any model is loaded)."""
    for source in sources:
        path = Path(source).expanduser()
        if not path.exists() and looks_like_path(source):
            raise ConversionError(f"data file {path} does not exist")


@dataclass
class DataOptions:
    """The training text: files, directories, hub datasets, or TEACHER_DATA for text the teacher writes
    (`teacher_sequences` sequences of seq_len tokens); the template of instruction records; what is held out."""

    sources: list[str | Path]
    template: str = "alpaca"
    teacher_sequences: int = 256
    val_records: int = 200
    val_sequences: int = 8
    max_records: int | None = None

    def check(self) -> None:
        """ConversionError for missing sources, TEACHER_DATA mixed with others, or counts out of range; before the
        teacher loads."""
        for name, lowest in (("teacher_sequences", 1), ("val_records", 0), ("val_sequences", 1), ("max_records", 1)):
            value = getattr(self, name)
            if not (is_int(value) and value >= lowest) and not (name == "max_records" and value is None):
                raise ConversionError(f"{name}={value!r} is not supported; accepted: integers >= {lowest}")
        if not self.sources:
            raise ConversionError(f"no training data: give data files/directories/hub datasets, or {TEACHER_DATA!r}")
        if self.from_teacher:
            return
        if any(str(s) == TEACHER_DATA for s in self.sources):
            check_sources([s for s in self.sources if str(s) != TEACHER_DATA])
            raise ConversionError(f"{TEACHER_DATA!r} cannot be combined with other data sources")
        check_sources(self.sources)

    @property
    def from_teacher(self) -> bool:
        return [str(s) for s in self.sources] == [TEACHER_DATA]


@dataclass
class EvalOptions:
    """lm-eval scoring of the teacher and the converted model (hf_based.eval); none without `tasks`."""

    tasks: str | Sequence[str] | None = None
    data_dir: str | Path | None = None  # local task data
    limit: int | float | None = None  # documents per task
    batch_size: int = 8
    teacher_results: dict | None = None  # the teacher's known scores: it is not evaluated again

    def check(self) -> None:
        """ConversionError for what would fail only after training: lm-eval missing, unknown task names, a data
        directory that does not exist, a limit or batch size out of range."""
        if not self.tasks:
            return
        if importlib.util.find_spec("lm_eval") is None:
            raise ConversionError("eval_tasks need lm-eval, which is not installed: pip install 'hf-based[eval]'")
        if not (self.limit is None or (is_number(self.limit) and self.limit > 0)):
            raise ConversionError(f"eval_limit={self.limit!r} is not supported; accepted: a number > 0")
        if not (is_int(self.batch_size) and self.batch_size >= 1):
            raise ConversionError(f"eval_batch_size={self.batch_size!r} is not supported; accepted: integers >= 1")
        names = split_tasks(self.tasks)
        if self.data_dir is not None:
            if not Path(self.data_dir).is_dir():
                raise ConversionError(f"eval_data_dir {self.data_dir} is not a directory")
            known = (*LOCAL_TASKS, *RETRIEVAL_NAMES)
            accepted = f"{', '.join(known)}, mmlu_* subjects"
            unknown = [name for name in names if name not in known and not name.startswith("mmlu_")]
        else:
            from lm_eval.tasks import TaskManager  # its task index takes seconds: still cheaper than a lost run

            known = set(TaskManager().all_tasks) | set(RETRIEVAL_NAMES)
            accepted = "lm-eval's task names (lm-eval ls tasks)"
            unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise ConversionError(f"unknown eval task(s) {', '.join(unknown) or '(none)'}; accepted: {accepted}")


def check_options(recipe: Recipe, data: DataOptions, evaluation: EvalOptions) -> None:
    """Every option, before any work starts: ConversionError naming the first that cannot be used."""
    recipe.validate()
    data.check()
    evaluation.check()
