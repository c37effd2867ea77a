"""Progress display. A long loop asks `progress_bar` for its bar: a tqdm bar of its own, or, inside `job_progress`
(the demo), a view of the one bar the whole job shows. That bar moves by each phase's expected share of the job's time
(stage, step and the loop's figures in its description, one ETA for everything), and while it runs whatever the
libraries write to stderr (their own bars, warnings, subprocess messages) is held back, and shown if the job fails."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

_JOB: ContextVar[JobProgress | None] = ContextVar("hf_based_job_progress", default=None)
HELD_BACK_SHOWN = 20_000  # characters of held-back stderr shown when the job fails (its end)


class JobProgress:
    """One bar over named phases, each weighted by its expected time (any unit: the ETA follows the measured rate)."""

    def __init__(self, weights: dict[str, float], file, disable: bool = False):
        self.weights = weights
        self.done = 0.0  # weight of the finished phases
        self.bar = tqdm(
            desc="starting",
            total=sum(weights.values()),
            file=file,
            disable=disable,
            dynamic_ncols=True,
            bar_format="{desc} |{bar}| {percentage:3.0f}% {elapsed}<{remaining}{postfix}",
        )

    def weight(self, description: str) -> float:
        """The weight of the phase that `description` names (its start), 0 for a step outside the plan."""
        return next((w for name, w in self.weights.items() if description.startswith(name)), 0.0)

    def show(self, description: str, fraction: float, weight: float) -> None:
        self.bar.set_description_str(description, refresh=False)
        self.bar.n = self.done + min(max(fraction, 0.0), 1.0) * weight
        self.bar.refresh()

    def finish(self, weight: float) -> None:
        self.done += weight
        self.bar.set_postfix_str("", refresh=False)
        self.bar.n = self.done
        self.bar.refresh()


class PhaseBar:
    """What `progress_bar` returns inside a job: tqdm's interface as the loops use it, moving the job's bar."""

    def __init__(self, job: JobProgress, iterable, total: int | None, desc: str, initial: int):
        self.job, self.iterable, self.desc, self.n = job, iterable, desc, initial
        self.total = len(iterable) if total is None and iterable is not None else total
        self.phase_weight, self.closed = job.weight(desc), False
        self._show()

    def _show(self) -> None:
        steps = f" {self.n}/{self.total}" if self.total else ""
        self.job.show(f"{self.desc}{steps}", self.n / self.total if self.total else 0.0, self.phase_weight)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._show()

    def set_postfix(self, **values) -> None:
        self.job.bar.set_postfix(values)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.job.finish(self.phase_weight)

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()


def progress_bar(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str, initial: int = 0, **tqdm_args
):
    """A tqdm bar for a long loop; inside `job_progress`, a view of the job's bar (tqdm_args then do not apply)."""
    job = _JOB.get()
    if job is None or tqdm_args.get("disable"):
        return tqdm(iterable, total=total, desc=desc, initial=initial, **tqdm_args)
    return PhaseBar(job, iterable, total, desc, initial)


@contextlib.contextmanager
def progress_phase(name: str) -> Iterator[None]:
    """A step of a job that has no loop of its own (loading, scoring): named on the job's bar while it runs."""
    job = _JOB.get()
    if job is None:
        yield
        return
    bar = PhaseBar(job, None, None, name, 0)
    yield
    bar.close()


@contextlib.contextmanager
def job_progress(weights: dict[str, float], show: bool = True) -> Iterator[JobProgress]:
    """The one progress display of a job made of the phases in `weights` (name -> expected time). Meanwhile stderr
    (sys.stderr and file descriptor 2, which subprocesses write to) goes to a temporary file; log records and the bar
    go to the terminal. If the job raises, the end of what was held back is written out before the error propagates."""
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    held = tempfile.TemporaryFile(mode="w+")
    job = JobProgress(weights, terminal, disable=not show)
    token = _JOB.set(job)
    failed = True
    try:
        with logging_redirect_tqdm():  # log records print above the bar, on the terminal
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.__stderr__):
                    handler.setStream(terminal)
            os.dup2(held.fileno(), 2)
            with contextlib.redirect_stderr(held):  # where sys.stderr does not write to descriptor 2
                yield job
        failed = False
        job.finish(job.bar.total - job.done)  # phases a resumed job skipped
    finally:
        _JOB.reset(token)
        job.bar.close()
        sys.stderr.flush()
        os.dup2(terminal.fileno(), 2)
        if failed:
            held.seek(0)
            text = held.read()
            if text.strip():
                terminal.write(f"--- stderr of the libraries, held back during the job ---\n{text[-HELD_BACK_SHOWN:]}")
        held.close()
        terminal.close()
