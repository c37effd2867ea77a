"""Multi-query associative recall (MQAR): the recall / recurrent-state-size tradeoff of BASED-family mixers.

`hf-based mqar --out DIR` trains small models of each mixer family on Zoology's MQAR task (Arora et al., "Zoology",
2023; HazyResearch/zoology `zoology/data/multiquery_ar.py`) and plots their accuracy against the size of their
recurrent state, like Figure 2 of the BASED paper (Arora et al., 2024).

The task (`multiquery_ar`): the vocabulary is split in halves, keys from [1, V/2) and values from [V/2, V). A
sequence starts with `num_kv_pairs` key-value pairs (distinct keys, distinct values), followed by query slots: every
key is asked once more, at an even offset of the rest of the sequence drawn without replacement from a power law
p(g) ~ g^(a - 1), a = 0.01 (short gaps favoured), and the model must then predict its value. Slots without a query
hold random tokens (Zoology's `random_non_queries=True`, the default of the configs behind the BASED figure). Loss
and accuracy count only those predictions. `labels` are in Zoology's convention, already shifted: `labels[:, t]` is
what the model must predict after reading `input_ids[:, t]` (the value, where `input_ids[:, t]` is a query key; -100
everywhere else), so the loss here is computed without the shift of transformers' `labels`.

Models (`ModelSpec`): Zoology's 2-layer MQAR models, each layer a BaseConv (short convolution, kernel 3) followed by
the mixer under test, one head. As hf-based layers every mixer has its own decoder layer with an MLP, so a "2-layer"
model here is the 4-layer stack [base_conv, mixer, base_conv, mixer] (Zoology has no MLPs in MQAR models), except
`based_no_conv`: [linear_attention, linear_attention]. Softmax mixers use RoPE; BASED linear attention has no
positional information at all (as in Zoology), so without the convolutions it cannot find the token after a key.

Training differs from Zoology in documented ways:
- every step draws a fresh batch (no fixed 100k-example training set, no epochs): cycling through the training
  tasks, one task per step;
- the quick sweep, to fit into 8 minutes of one H200: one learning rate per run (Zoology keeps the best of 4) and,
  on CUDA, a time budget: each run trains for the steps that fit its share of `time_budget_s` (measured once every
  training shape has been compiled; at most `max_steps`). Every run stops early once its training accuracy on fresh
  data reaches 99% (Zoology's early stop). The steps taken are recorded with each run.

Speed: the models are tiny, so an eager step is host-bound (hundreds of small kernels). On CUDA each training step is
replayed from a CUDA graph captured per batch shape (`TrainingStep`), and `--together K` trains K runs at once on
the same batches, each on its own stream, so that their kernels overlap (`train_runs`).

State size (`BasedConfig.recurrent_state_size`): the elements per sequence that our cache keeps after the sequence,
over all layers. For attention that is 2 * d_model * seq_len per attention layer; for BASED it counts the
1 + d + d^2 Taylor features that the cache stores (Zoology counts the packed 1 + d + d(d+1)/2, ~1.8x less at d = 16).

Runs are appended to DIR/results.jsonl as they finish; rerunning the same command skips finished runs, so an
interrupted sweep resumes. The summary goes to DIR/results.json, DIR/results.md and DIR/mqar.png.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hf_based.bench import report
from hf_based.bench.mqar_sweeps import (
    FAMILIES,
    POWER_A,
    VOCAB_SIZE,
    ModelSpec,
    Settings,
    Task,
    check_task,
)
from hf_based.bench.throughput import synchronize
from hf_based.modeling import BasedForCausalLM
from hf_based.modeling.prefill_graphs import capture
from hf_based.training import autocast_for, lr_factor
from hf_based.utils import pyplot

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Data


class MQARBatch(NamedTuple):
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64: the value after each query key, -100 elsewhere (already shifted)
    positions: torch.Tensor  # [B, N] int64: where the queries are (the positions with a label), in key order


def sample_mqar(
    num_examples,
    seq_len,
    num_kv_pairs,
    vocab_size=VOCAB_SIZE,
    power_a=POWER_A,
    random_non_queries=True,
    generator=None,
    device=None,
) -> MQARBatch:
    """`multiquery_ar` with the query positions (for gathering the predictions without a host sync)."""
    check_task(seq_len, num_kv_pairs, vocab_size)
    device = torch.device(device) if device is not None else (generator.device if generator else torch.device("cpu"))
    g = generator
    batch, n, half = num_examples, num_kv_pairs, vocab_size // 2

    def uniform(*shape):
        return torch.rand(*shape, generator=g, device=device)

    # a random n-subset in random order: the top n of i.i.d. uniform scores (np.random.choice(replace=False))
    keys = uniform(batch, half - 1).topk(n, dim=1).indices + 1
    values = uniform(batch, vocab_size - half).topk(n, dim=1).indices + half
    # gaps g = 1..space without replacement, p(g) ~ g^(a-1): Gumbel top-n of log p (successive sampling)
    space = (seq_len - 2 * n) // 2
    log_p = (power_a - 1) * torch.arange(1, space + 1, device=device, dtype=torch.float32).log()
    gumbel = -(-uniform(batch, space).clamp_min(1e-20).log()).log()
    gaps = (log_p + gumbel).topk(n, dim=1).indices  # 0-based: the query of key i sits at 2n + 2 gaps[i]

    input_ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    input_ids[:, 0 : 2 * n : 2] = keys
    input_ids[:, 1 : 2 * n : 2] = values
    positions = 2 * n + 2 * gaps
    input_ids.scatter_(1, positions, keys)
    labels = torch.full_like(input_ids, -100).scatter_(1, positions, values)
    if random_non_queries:
        filler = (uniform(batch, seq_len) * vocab_size).long().clamp_max(vocab_size - 1)
        input_ids = torch.where(input_ids == 0, filler, input_ids)
    return MQARBatch(input_ids, labels, positions)


def multiquery_ar(
    num_examples,
    seq_len,
    num_kv_pairs,
    vocab_size=VOCAB_SIZE,
    power_a=POWER_A,
    random_non_queries=True,
    seed=0,
    device="cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoology's MQAR examples, seeded: (input_ids [N, T], labels [N, T]), labels as described in the module doc."""
    generator = torch.Generator(device).manual_seed(seed)
    batch = sample_mqar(num_examples, seq_len, num_kv_pairs, vocab_size, power_a, random_non_queries, generator)
    return batch.input_ids, batch.labels


# ---------------------------------------------------------------------------------------------------------------
# Training


def predictions(model: BasedForCausalLM, batch: MQARBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, N, V] (fp32) at the query positions, and their targets [B, N]."""
    hidden = model.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state
    index = batch.positions[..., None].expand(-1, -1, hidden.shape[-1])
    logits = model.lm_head(hidden.gather(1, index)).float()  # only N of the T positions: 8x less lm_head work
    return logits, batch.labels.gather(1, batch.positions)


@functools.lru_cache(maxsize=4)
def held_out_sets(settings: Settings) -> tuple[MQARBatch, ...]:
    """Each test task's fixed test set, on the CPU: seeded apart from training, the same for every run (built once)."""
    return tuple(
        sample_mqar(
            settings.test_examples,
            task.seq_len,
            task.num_kv_pairs,
            settings.vocab_size,
            settings.power_a,
            settings.random_non_queries,
            torch.Generator("cpu").manual_seed(10_000 + 97 * settings.seed + i),
        )
        for i, task in enumerate(settings.test_tasks)
    )


@torch.no_grad()
def evaluate(model, settings: Settings, device: torch.device, eval_batch: int = 250) -> dict[str, float]:
    """Accuracy on each test task's test set (`held_out_sets`)."""
    model.eval()
    accuracy = {}
    for task, data in zip(settings.test_tasks, held_out_sets(settings)):
        correct = torch.zeros((), device=device)
        for start in range(0, settings.test_examples, eval_batch):
            batch = MQARBatch(*(x[start : start + eval_batch].to(device) for x in data))
            with autocast_for(device)():
                logits, targets = predictions(model, batch)
            correct += (logits.argmax(-1) == targets).sum()
        accuracy[task.name] = correct.item() / (settings.test_examples * task.num_kv_pairs)
    model.train()
    return accuracy


def still_improving(curve: list[list[float]], margin: float = 0.01) -> bool:
    """Whether a run's training accuracy ([step, accuracy] checks) was still rising at its end: the best of its last
    quarter of checks beats the best before it by more than `margin`."""
    accuracies = [accuracy for _, accuracy in curve]
    cut = len(accuracies) - max(1, len(accuracies) // 4)
    return cut > 0 and max(accuracies[cut:]) > max(accuracies[:cut]) + margin


def run_name(spec: ModelSpec, lr: float, settings: Settings) -> str:
    return f"{spec.name}-lr{lr:.3g}" if len(settings.learning_rates) > 1 else spec.name


class TrainingStep:
    """One optimizer step on a batch, eager or, on CUDA, replayed from a CUDA graph captured per batch shape.

    A tiny model's eager step is host-bound: some hundreds of small kernels launched one by one. The first batch of
    each shape runs eagerly (compiling the kernels and creating the optimizer state), is then captured, and later
    batches of that shape are copied into the capture's inputs and replayed. The graphs share one memory pool (they
    never run at once) and the gradients (zeroed in place, so that each graph writes the same tensors). Accuracy on
    the training batches accumulates in `correct` without a host sync."""

    def __init__(self, model: BasedForCausalLM, lr: float, weight_decay: float, device: torch.device, graphs: bool):
        if graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model, self.device = model, device
        self.params = list(model.parameters())
        # On CUDA the learning rate is a tensor the graphs read, set in place each step (fused AdamW, capturable).
        cuda = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=torch.tensor(lr, device=device) if cuda else lr,
            weight_decay=weight_decay,
            fused=cuda,
            capturable=cuda,
        )
        self.compute = autocast_for(device, cache_enabled=not graphs)
        self.correct = torch.zeros((), device=device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, MQARBatch, torch.Tensor]] | None = {} if graphs else None

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _step(self, batch: MQARBatch) -> torch.Tensor:
        with self.compute():
            logits, targets = predictions(self.model, batch)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        with torch.no_grad():
            self.correct += (logits.argmax(-1) == targets).sum()
        return loss.detach()

    def __call__(self, batch: MQARBatch) -> torch.Tensor:
        """Train on `batch`; returns the loss (on the device; a graph's output, overwritten by its next replay)."""
        if self.graphs is None:
            return self._step(batch)
        key = tuple(batch.input_ids.shape) + tuple(batch.positions.shape)
        if key not in self.graphs:
            static = MQARBatch(*(x.clone() for x in batch))
            losses = []
            pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None
            # capture() steps eagerly once (this batch's step), then records the step without running it
            try:
                graph = capture(lambda: losses.append(self._step(static)), self.device, pool)
            except RuntimeError as error:
                if not losses:  # the eager step failed: a real error
                    raise
                logger.warning("CUDA graph capture failed, training eagerly: %s", str(error).splitlines()[0][:200])
                self.graphs = None
                return losses[0]
            self.graphs[key] = (graph, static, losses[-1])
            return losses[0]
        graph, static, loss = self.graphs[key]
        for target, source in zip(static, batch):
            target.copy_(source)
        graph.replay()
        return loss


def calibration_steps(settings: Settings) -> tuple[int, int]:
    """The steps between which a run under a time budget measures its step time: after every training shape has
    been compiled (and captured)."""
    start = max(10, len(settings.training_cycle) + 5)
    return start, start + 20


class Run:
    """One model at one learning rate, while it trains: its model, training step, stream and curve."""

    def __init__(self, spec: ModelSpec, lr: float, settings: Settings, device: torch.device, graphs: bool):
        self.spec, self.lr, self.name, self.graphs = spec, lr, run_name(spec, lr, settings), graphs
        torch.manual_seed(settings.seed)  # every run of a model starts from the same weights
        self.config = spec.config(settings.vocab_size, settings.max_len)
        self.model = BasedForCausalLM(self.config).to(device).train()
        self.train_step: TrainingStep | None = TrainingStep(self.model, lr, settings.weight_decay, device, graphs)
        # its own stream on CUDA, so that the kernels of runs trained together overlap
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.total, self.steps, self.counted, self.curve = settings.max_steps, 0, 0, []
        self.last_accuracy, self.early_stopped, self.final_loss, self.loss = float("nan"), False, float("nan"), None

    def stream_context(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def record(self, settings: Settings, accuracy: dict, train_seconds: float, eval_seconds: float, group: int):
        return {
            "name": self.name,
            "model": self.spec.name,
            "family": self.spec.family,
            **{k: v for k, v in dataclasses.asdict(self.spec).items() if k != "family"},
            "mixer_types": self.config.mixer_types,
            "parameters": self.model.num_parameters(),
            "state_size": {t.name: sum(self.config.recurrent_state_size(t.seq_len)) for t in settings.test_tasks},
            "accuracy": accuracy,
            "steps": self.steps,
            "early_stopped": self.early_stopped,
            "still_improving": not self.early_stopped and still_improving(self.curve),
            "curve": self.curve,
            "train_accuracy": self.last_accuracy,
            "final_loss": self.final_loss,
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            "trained_together": group,
            "cuda_graphs": self.graphs,
            "lr": self.lr,
            "settings": settings.fingerprint(),
        }


def train_runs(
    planned: list[tuple[ModelSpec, float]],
    settings: Settings,
    device: torch.device,
    time_budget_s: float | None = None,
    progress=None,
    graphs: bool | None = None,
    on_done: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train models (spec, learning rate) together on the same fresh MQAR batches, step by step, and evaluate each
    as it ends; returns their records in order, each with its training-accuracy curve (a run that raised: its
    failed record). Every run of the sweep draws the same data (the settings' seed), so runs trained together share
    each batch and end as they would alone; on CUDA each steps on its own stream, so that the small kernels of
    several runs fill the GPU together. time_budget_s: the group's training + evaluation time, from which the steps
    are set once the step time is measured. graphs: replay the training steps from CUDA graphs (default: on CUDA).
    on_done(record): called as each run ends."""
    graphs = device.type == "cuda" if graphs is None else graphs
    start = time.perf_counter()
    records: dict[str, dict] = {}
    runs = []
    for spec, lr in planned:
        try:
            runs.append(Run(spec, lr, settings, device, graphs))
        except Exception as error:  # noqa: BLE001 - one model that cannot be built must not end the others
            records[run_name(spec, lr, settings)] = failed_run(spec, run_name(spec, lr, settings), error)
    generator = torch.Generator(device).manual_seed(settings.seed + 1)
    warmup = min(settings.warmup_steps, settings.max_steps)
    calibrate, marks, step = calibration_steps(settings), {}, 0
    active = list(runs)

    def end(run: Run, error: Exception | None = None) -> None:
        active.remove(run)
        if error is not None:
            records[run.name] = failed_run(run.spec, run.name, error)
        else:
            train_seconds = time.perf_counter() - start
            run.graphs = run.train_step.graphs is not None  # False once a failed capture sent the run back to eager
            run.train_step = run.loss = None  # its graphs' memory
            accuracy = evaluate(run.model, settings, device)
            records[run.name] = run.record(
                settings, accuracy, train_seconds, time.perf_counter() - start - train_seconds, len(planned)
            )
        run.model = None
        if on_done is not None:
            on_done(records[run.name])

    while active:
        task = settings.train_task(step)
        batch = training_batch(settings, task, generator)
        for run, error in step_together(active, batch, step, warmup):
            end(run, error)
        step += 1
        for run in active:
            run.steps = step
            run.counted += settings.batch_size * task.num_kv_pairs
        if time_budget_s is not None and step in calibrate and active:
            synchronize(device)
            marks[step] = time.perf_counter()
            if step == calibrate[1]:
                step_time = (marks[calibrate[1]] - marks[calibrate[0]]) / (calibrate[1] - calibrate[0])
                left = start + time_budget_s - marks[step]
                for run in active:
                    run.total = max(calibrate[1], min(settings.max_steps, step + int(left / step_time)))
        for run in list(active):
            if step % settings.check_every and step != run.total:
                continue
            synchronize(device)
            run.last_accuracy = run.train_step.correct.item() / run.counted
            run.curve.append([step, round(run.last_accuracy, 4)])
            run.final_loss = run.loss.item()
            if progress is not None:
                progress.set_postfix_str(f"step {step}/{run.total} acc {run.last_accuracy:.3f}")
            run.train_step.correct.zero_()
            run.counted = 0
            run.early_stopped = run.last_accuracy >= settings.early_stop_accuracy
            if run.early_stopped or step == run.total:
                end(run)
    return [records[run_name(spec, lr, settings)] for spec, lr in planned]


def training_batch(settings: Settings, task: Task, generator: torch.Generator) -> MQARBatch:
    """A fresh training batch of `task` under the settings' batch size, vocabulary and query distribution."""
    return sample_mqar(
        settings.batch_size,
        task.seq_len,
        task.num_kv_pairs,
        settings.vocab_size,
        settings.power_a,
        settings.random_non_queries,
        generator,
    )


def step_together(runs: list[Run], batch: MQARBatch, step: int, warmup: int) -> list[tuple[Run, Exception]]:
    """Training step `step` of each run on `batch`, each on its own stream on CUDA (after the stream that sampled
    the batch); returns the runs that raised, with their errors."""
    failed = []
    sampling_stream = torch.cuda.current_stream(batch.input_ids.device) if batch.input_ids.is_cuda else None
    for run in runs:
        try:
            with run.stream_context():
                if run.stream is not None:
                    run.stream.wait_stream(sampling_stream)
                    for tensor in batch:
                        tensor.record_stream(run.stream)
                run.train_step.set_lr(run.lr * lr_factor(step, run.total, warmup))
                run.loss = run.train_step(batch)
        except Exception as error:  # noqa: BLE001 - one failing run must not end the others
            failed.append((run, error))
    return failed


def train_and_evaluate(
    spec: ModelSpec,
    settings: Settings,
    device: torch.device,
    time_budget_s: float | None = None,
    progress=None,
    lr: float | None = None,
    graphs: bool | None = None,
) -> dict:
    """One run of `train_runs`: the model at learning rate `lr` (default: settings.lr)."""
    return train_runs([(spec, settings.lr if lr is None else lr)], settings, device, time_budget_s, progress, graphs)[0]


def read_runs(out: Path, fingerprint: str) -> dict[str, dict]:
    """The finished runs under these settings, by name, from out/results.jsonl and each worker's file."""
    runs = {}
    for path in sorted(out.glob("results*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # blank, or cut short by an interruption: that run is redone
                continue
            if isinstance(record, dict) and record.get("settings") == fingerprint and "name" in record:
                runs[record["name"]] = record
    return runs


def planned_runs(settings: Settings, specs: list[ModelSpec]) -> list[tuple[ModelSpec, float]]:
    return [(spec, lr) for spec in specs for lr in settings.learning_rates]


def failed_run(spec: ModelSpec, name: str, error: Exception | str) -> dict:
    """The record of a run that did not finish: what the report shows in its place."""
    if isinstance(error, Exception):
        error = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
    return {"name": name, "model": spec.name, "family": spec.family, "error": error}


def run_sweep(
    settings: Settings,
    specs: list[ModelSpec],
    out: Path,
    device: torch.device,
    show_progress: bool = True,
    worker: tuple[int, int] = (0, 1),
    graphs: bool | None = None,
    together: int = 1,
) -> list[dict]:
    """Train and evaluate every spec at every learning rate of the settings, except the runs already finished under
    these settings in out/results*.jsonl; returns the runs in spec order. `worker` (index, count): this process takes
    every count-th run from `index` and logs to its own file, beside the other workers. together: runs trained at
    once (`train_runs`). With a time budget, the runs still to do share the part of it that is theirs
    (len(todo) / number of runs). graphs: as in `train_runs`."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    index, count = worker
    log = out / ("results.jsonl" if count == 1 else f"results.worker{index}.jsonl")
    done = read_runs(out, settings.fingerprint())
    planned = planned_runs(settings, specs)[index::count]
    todo = [(spec, lr) for spec, lr in planned if run_name(spec, lr, settings) not in done]
    budget = settings.time_budget_s
    deadline = time.perf_counter() + budget * len(todo) / len(planned) if budget else None
    headline = settings.headline.name
    bar = tqdm(total=len(todo), desc="mqar", unit="run", disable=not show_progress)

    def finished(record: dict) -> None:
        done[record["name"]] = record
        bar.update()
        if "error" in record:  # not logged: retried by the next run of the command
            bar.write(f"{record['name']}: FAILED ({record['error']})")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        bar.write(
            f"{record['name']}: {headline} accuracy {record['accuracy'][headline]:.3f}, "
            f"state {record['state_size'][headline]:,}, {record['steps']} steps, "
            f"{record['train_seconds'] + record['eval_seconds']:.0f} s"
            + (", still improving" if record["still_improving"] else "")
        )

    eval_reserve = 0.0  # the last group's evaluation time, held back from the next group's training budget
    for first in range(0, len(todo), together):
        group = todo[first : first + together]
        bar.set_description(f"mqar {', '.join(run_name(spec, lr, settings) for spec, lr in group)}")
        group_budget = None
        if deadline is not None:
            share = (deadline - time.perf_counter()) * len(group) / (len(todo) - first)
            group_budget = max(1.0, share - eval_reserve)
        records = train_runs(group, settings, device, group_budget, progress=bar, graphs=graphs, on_done=finished)
        eval_reserve = sum(r.get("eval_seconds", 0.0) for r in records)
    bar.close()
    return [done[run_name(spec, lr, settings)] for spec, lr in planned]


def collect_runs(settings: Settings, specs: list[ModelSpec], out: Path) -> list[dict]:
    """Every planned run as its workers logged it, in spec order; one that none finished is recorded as failed."""
    done = read_runs(out, settings.fingerprint())
    runs = []
    for spec, lr in planned_runs(settings, specs):
        name = run_name(spec, lr, settings)
        runs.append(done.get(name) or failed_run(spec, name, "not finished (see the workers)"))
    return runs


def best_runs(runs: list[dict], headline: str) -> list[dict]:
    """Per model, its run at the learning rate with the best `headline` accuracy (a failed run only if all failed)."""
    best: dict[str, dict] = {}
    for run in runs:
        model = run.get("model", run["name"])
        kept = best.get(model)
        if kept is None or ("error" in kept and "error" not in run):
            best[model] = run
        elif "error" not in run and run["accuracy"][headline] > kept["accuracy"][headline]:
            best[model] = run
    return list(best.values())


# ---------------------------------------------------------------------------------------------------------------
# Reports


def write_report(runs: list[dict], settings: Settings, out: Path, env: dict) -> None:
    """results.json (every run, with its curve), results.md and mqar.png (per model, its best learning rate; a run
    still improving at its end is marked)."""
    headline = settings.headline.name
    data = {"environment": env, "settings": dataclasses.asdict(settings), "headline_task": headline, "runs": runs}
    report.write_json(out / "results.json", data)
    tasks_ = [t.name for t in settings.test_tasks]
    best = best_runs(runs, headline)
    rows = [
        [
            r["name"],
            r["parameters"],
            f"{r['state_size'][headline]:,}",
            f"{r['lr']:.3g}",
            r["steps"],
            "yes" if r.get("still_improving") else "",
            f"{r['train_seconds'] + r['eval_seconds']:.0f}",
            *(f"{r['accuracy'][t]:.3f}" for t in tasks_),
        ]
        if "error" not in r
        else [r["name"], "", "", "", "", "", "", f"FAILED: {r['error']}", *[""] * (len(tasks_) - 1)]
        for r in best
    ]
    table = report.markdown_table(
        ["run", "params", f"state ({headline})", "lr", "steps", "still improving", "s", *(f"acc {t}" for t in tasks_)],
        rows,
    )
    train = ", ".join(t.name for t in settings.train_tasks)
    (out / "results.md").write_text(
        f"# MQAR: accuracy vs recurrent state size\n\n{report.environment_lines(env)}\n\n"
        f"Tasks are seq_len x kv_pairs; vocab {settings.vocab_size}; training cycles through {train} "
        f"(in proportions {list(settings.train_weights or [1] * len(settings.train_tasks))}, fresh batches of "
        f"{settings.batch_size}); lr {', '.join(f'{lr:.3g}' for lr in settings.learning_rates)} (per model, the best "
        f"at {headline} is shown; every run with its training curve is in results.json), wd {settings.weight_decay}; "
        f"time budget {settings.time_budget_s} s; {settings.test_examples} test examples per task. "
        f"State = elements per sequence our cache keeps after {settings.headline.seq_len} tokens.\n\n"
        f"{table}\n\n![mqar](mqar.png)\n"
    )
    plot([r for r in best if "error" not in r], settings, out)


def plot(runs: list[dict], settings: Settings, out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        logger.warning("matplotlib is missing: skipped mqar.png (rerun with --plot-only where it is installed)")
        return None
    headline = settings.headline.name
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    panels = [
        (axes[0], lambda r: r["accuracy"][headline], f"MQAR accuracy, {headline} (seq len x kv pairs)"),
        (axes[1], lambda r: sum(r["accuracy"].values()) / len(r["accuracy"]), "mean accuracy over the test tasks"),
    ]
    for ax, accuracy, title in panels:
        for key, family in FAMILIES.items():
            members = sorted((r for r in runs if r["family"] == key), key=lambda r: r["state_size"][headline])
            if not members:
                continue
            x = [r["state_size"][headline] for r in members]
            ax.scatter(
                x,
                [accuracy(r) for r in members],
                marker=family.marker,
                edgecolors=family.color,
                facecolors=[("none" if r.get("still_improving") else family.color) for r in members],
                s=60,
                label=family.label,
                zorder=3,
            )
            for r, xi in zip(members, x):
                tag = (
                    f"d{r['d_model']}"
                    + (f" f{r['feature_dim']}" if r["feature_dim"] else "")
                    + (f" w{r['window']}" if r["window"] else "")
                )
                ax.annotate(tag, (xi, accuracy(r)), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(2 / settings.vocab_size, color="gray", linestyle=":", linewidth=1, label="chance")
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="gray", label="still improving at its end")
        ax.set_xscale("log")
        ax.set_xlabel(f"recurrent state size (elements per sequence, after {settings.headline.seq_len} tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = out / "mqar.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
