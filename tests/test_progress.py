"""The job-wide progress display: loops advance one bar by their phase's weight; library output is held back and shown
only when the job fails."""

import logging
import os
import sys

import pytest
from tqdm.auto import tqdm

from hf_based.progress import job_progress, progress_bar, progress_phase


def test_outside_a_job_a_loop_gets_its_own_tqdm_bar():
    bar = progress_bar(range(3), desc="alone", disable=True)
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]


def test_loops_advance_one_bar_by_their_phase_weights():
    seen = []
    with job_progress({"stage 1": 30.0, "stage 2": 10.0, "scoring": 60.0}) as job:
        bar = progress_bar(total=6, desc="stage 1 attention transfer", initial=2)  # resumed at step 2
        assert job.bar.n == pytest.approx(10.0)
        for _ in range(4):
            bar.update()
            seen.append((job.bar.desc, job.bar.n))
        bar.set_postfix(loss="1.5")
        bar.close()
        bar.close()  # twice: counted once
        for _ in progress_bar(["a", "b"], desc="stage 2 LoRA"):
            seen.append((job.bar.desc, job.bar.n))
        with progress_phase("not in the plan"):
            assert job.bar.n == pytest.approx(40.0) and job.bar.desc.startswith("not in the plan")
        total = job.bar.total
    assert seen[:4] == [(f"stage 1 attention transfer {i}/6", pytest.approx(5.0 * i)) for i in range(3, 7)]
    assert seen[4:] == [("stage 2 LoRA 0/2", pytest.approx(30.0)), ("stage 2 LoRA 1/2", pytest.approx(35.0))]
    assert total == 100.0 and job.bar.n == pytest.approx(100.0)  # a finished job ends full (skipped phases too)


def test_library_output_is_held_back_and_log_records_still_show(capfd):
    logger = logging.getLogger("hf_based.test_progress")
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:
        with job_progress({"phase": 1.0}, show=False):
            print("a library's warning", file=sys.stderr, flush=True)
            os.write(2, b"a subprocess message\n")
            logger.warning("our own message")
    finally:
        logging.getLogger().removeHandler(handler)
    err = capfd.readouterr().err
    assert "our own message" in err
    assert "a library's warning" not in err and "a subprocess message" not in err
    print("after the job", file=sys.stderr, flush=True)
    assert "after the job" in capfd.readouterr().err  # stderr is back


def test_a_failed_job_shows_what_was_held_back(capfd):
    with pytest.raises(RuntimeError, match="boom"), job_progress({"phase": 1.0}, show=False):
        os.write(2, b"the library's explanation\n")
        raise RuntimeError("boom")
    err = capfd.readouterr().err
    assert "held back during the job" in err and "the library's explanation" in err
