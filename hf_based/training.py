"""Training utilities shared by conversion (joint and block-wise attention transfer, LoRA) and the MQAR benchmark:
the learning-rate schedule, bf16 autocast, atomic checkpoints, the process group, and the conversion's loop.

A small loop of our own rather than HF Trainer: stage 1's loss lives in forward hooks, it clips each layer on its
own (so that block-wise training equals joint training) and syncs its few gradients by hand, and block-wise training
feeds saved hidden states rather than token batches. Each of those would be a Trainer subclass; written out, the
loop, its checkpoints and its resume logic fit on one screen.

Checkpoints hold the trainable parameters, the optimizer state, the step and the loss history (the data position is
the step: the data order is a function of the seed): tensors and plain containers only, read with
`torch.load(weights_only=True)`, so that a planted file cannot run code. They are written atomically (temporary file +
rename) every `Checkpointing.every` steps and at the end of the stage; a rerun of the same command continues from the
last one if its `key` (every setting that changes the stage's result) matches. A finished stage is not reused when it
diverged (`unusable`).
In a multi-process run (accelerate launch), torch.distributed.checkpoint gathers full state dicts, so DDP and FSDP2
runs checkpoint alike.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hf_based.errors import ConversionError, NonFiniteLossError
from hf_based.outputs import atomic_write
from hf_based.progress import progress_bar
from hf_based.utils import pyplot

logger = logging.getLogger(__name__)


@dataclass
class Dist:
    """Where this process stands in a (possibly) multi-process run."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    accelerator: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def create(cls) -> Dist:
        """Single process, or the process group that `accelerate launch` / torchrun set up (CPU: gloo)."""
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 and "LOCAL_RANK" not in os.environ:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> float:
        if self.world > 1:
            value = value.detach().clone().to(self.device)
            torch.distributed.all_reduce(value)
            value = value / self.world
        return float(value)

    def all_reduce_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Average gradients over processes (stage 1: a few small tensors, so no DDP wrapper is needed)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.world


def _clip(params: Sequence[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients of `params` to a total norm of `max_norm`; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "cosine") -> float:
    """The learning rate of step `step` (0-based) of `total`, as a fraction of the peak: a linear warm-up over
    `warmup` steps, then constant, or cosine decay to 10% of the peak at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def uses_bf16(device: torch.device, precision: str | None = None) -> bool:
    """bf16 compute on CUDA (unless precision="fp32"), fp32 elsewhere (unless "bf16"); parameters stay fp32."""
    return precision == "bf16" or (precision is None and device.type == "cuda")


def autocast_for(
    device: torch.device, precision: str | None = None, cache_enabled: bool = True
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the compute-precision context for `device`: bf16 autocast where `uses_bf16`, else nothing.
    cache_enabled=False for work captured in CUDA graphs (autocast's cast cache must not outlive a capture)."""
    if uses_bf16(device, precision):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return contextlib.nullcontext


# --- checkpoints ----------------------------------------------------------------------------------------------------


# A finished stage whose mean loss over its last steps exceeds its first step's loss by this factor diverged.
DIVERGENCE_FACTOR = 2.0


def atomic_save(obj, path: Path) -> None:
    """torch.save through a temporary file renamed to `path` (`outputs.atomic_write`)."""
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def load_saved(path: Path, mmap: bool = False):
    """What hf-based saved at `path` (tensors and plain containers, never code: weights_only); ConversionError for a
    truncated or foreign file."""
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, foreign, or a pickle that would run code
        raise ConversionError(
            f"cannot read {path} ({type(error).__name__}: not a file hf-based wrote, or damaged); delete it or pass "
            "--no-resume"
        ) from error


def unusable(history: Sequence[dict], params: Iterable[torch.Tensor]) -> str | None:
    """Why a finished stage cannot be used, or None: non-finite parameters, a non-finite final loss, or a final loss
    (mean over the last 10 steps) more than DIVERGENCE_FACTOR x the first step's."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        return "has non-finite parameters"
    if not history:
        return None
    first, last = history[0]["loss"], StageResult("", 0, 0, 0.0, list(history)).final_loss()
    if not math.isfinite(last):
        return f"ended with a loss of {last}"
    if last > DIVERGENCE_FACTOR * first:
        return f"diverged: its final loss {last:.4g} is more than {DIVERGENCE_FACTOR:g}x its first {first:.4g}"
    return None


def _state_dicts(model: nn.Module, optimizer, dist: Dist) -> tuple[dict, dict]:
    """Trainable parameters and optimizer state; in a multi-process run gathered in full by rank 0 (a collective)."""
    if dist.world == 1:
        trainable = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        return trainable, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_state_dict(model, optimizer, options=options)


def save_checkpoint(path: Path, model, optimizer, step: int, history: list, key: dict, dist: Dist, done: bool) -> None:
    model_state, optim_state = _state_dicts(model, optimizer, dist)
    if dist.is_main:
        atomic_save(
            {
                "step": step,
                "done": done,
                "model": model_state,
                "optimizer": optim_state,
                "history": history,
                "key": key,
                "rng": torch.get_rng_state(),
            },
            path,
        )
    dist.barrier()


def differing_settings(key: dict, saved_key: dict) -> list[str]:
    """The settings whose values differ between two keys, as "name (saved -> now)"."""
    return [
        f"{k} ({saved_key.get(k)!r} -> {key.get(k)!r})"
        for k in sorted(set(key) | set(saved_key))
        if key.get(k) != saved_key.get(k)
    ]


def read_checkpoint(path: Path, key: dict) -> dict | None:
    """The checkpoint at `path`, if any; ConversionError if it is not one of ours, belongs to a run with different
    settings, or is a finished stage that cannot be used (`unusable`)."""
    if not path.is_file():
        return None
    checkpoint = load_saved(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("key"), dict):
        raise ConversionError(f"{path} is not a file hf-based wrote; delete it or pass --no-resume")
    differs = differing_settings(key, checkpoint["key"])
    if differs:
        raise ConversionError(
            f"{path} comes from a run with different settings: {', '.join(differs)}; "
            "rerun with the same options, pass --no-resume to start over, or use another OUT"
        )
    problem = checkpoint.get("done") and unusable(checkpoint["history"], checkpoint["model"].values())
    if problem:
        raise ConversionError(
            f"the finished stage in {path} {problem}; lower the learning rate or check the data, then rerun with "
            "--no-resume"
        )
    return checkpoint


def load_checkpoint(checkpoint: dict, model, optimizer, dist: Dist) -> None:
    if dist.world == 1:
        result = model.load_state_dict(checkpoint["model"], strict=False)
        if result.unexpected_keys:
            raise ConversionError(f"the checkpoint holds unknown parameters {result.unexpected_keys[:3]}")
        optimizer.load_state_dict(checkpoint["optimizer"])
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            optimizer,
            model_state_dict=checkpoint["model"],
            optim_state_dict=checkpoint["optimizer"],
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
    torch.set_rng_state(checkpoint["rng"])


# --- the loop -------------------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    name: str
    steps: int
    tokens: int
    seconds: float  # training time, summed over interrupted and resumed runs
    history: list[dict]
    skipped: bool = False

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    @property
    def steady_tokens_per_second(self) -> float | None:
        """Tokens/s over the second half of the steps: without the first steps' kernel compilation and warm-up."""
        if len(self.history) < 4:
            return None
        mid, last = self.history[len(self.history) // 2 - 1], self.history[-1]
        seconds = last["seconds"] - mid["seconds"]
        return (last["tokens"] - mid["tokens"]) / seconds if seconds > 0 else None

    def final_loss(self, last: int = 10) -> float | None:
        """Mean training loss over the last `last` steps."""
        losses = [h["loss"] for h in self.history[-last:]]
        return sum(losses) / len(losses) if losses else None


@dataclass
class Schedule:
    """How a stage optimises: `steps` optimizer steps of `grad_accum` micro-steps, the learning rate at its peak and
    its schedule (`lr_factor`), and the gradient-norm clip."""

    steps: int
    grad_accum: int
    lr: float
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    max_grad_norm: float = 1.0


@dataclass
class Checkpointing:
    """Where a stage checkpoints, how often, and the settings (`key`) a checkpoint must match to be resumed."""

    path: Path
    key: dict
    every: int = 50


def train(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[int, int], tuple[torch.Tensor, int]],
    schedule: Schedule,
    checkpointing: Checkpointing,
    dist: Dist,
    *,
    clip_groups: Sequence[Sequence[nn.Parameter]] = (),
    sync_grads: Callable[[], None] | None = None,
    progress: bool = True,
    on_step: Callable[[str, int], None] | None = None,
) -> StageResult:
    """Run the optimizer steps of `schedule`, resuming from `checkpointing.path` if it exists.

    loss_fn(step, micro) -> (loss of one micro-batch, tokens in it across all processes). Each group in `clip_groups`
    (default: all of the optimizer's parameters) is clipped to `schedule.max_grad_norm` on its own. A NaN/inf loss or
    gradient norm raises NonFiniteLossError before the optimizer step, so the last checkpoint stays the last good
    state. `on_step(name, step)` runs after each step.
    """
    steps, checkpoint = schedule.steps, checkpointing.path
    history: list[dict] = []
    start = 0
    saved = read_checkpoint(checkpoint, checkpointing.key)
    if saved is not None:
        load_checkpoint(saved, model, optimizer, dist)
        start, history = saved["step"], saved["history"]
        if dist.is_main and start < steps:
            logger.info("%s: resuming from %s at step %d/%d", name, checkpoint, start, steps)
    if start > steps:
        raise ConversionError(
            f"{checkpoint} holds {start} steps of {name}, more than the {steps} asked; ask for at least {start} or "
            "pass --no-resume"
        )
    if start == steps:
        tokens = history[-1]["tokens"] if history else 0
        seconds = history[-1]["seconds"] if history else 0.0
        return StageResult(name, start, tokens, seconds, history)

    model.train()
    tokens = history[-1]["tokens"] if history else 0
    seconds = history[-1]["seconds"] if history else 0.0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    last_saved = start
    bar = progress_bar(
        total=steps, initial=start, desc=name, unit="step", disable=not (progress and dist.is_main), dynamic_ncols=True
    )
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            step_lr = schedule.lr * lr_factor(step, steps, schedule.warmup_steps, schedule.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            total = torch.zeros((), device=dist.device)
            step_tokens = 0
            for micro in range(schedule.grad_accum):
                loss, n = loss_fn(step, micro)
                (loss / schedule.grad_accum).backward()
                total += loss.detach().float() / schedule.grad_accum
                step_tokens += n
            if sync_grads is not None:
                sync_grads()
            loss_value = dist.mean(total)
            groups = clip_groups or [params]
            grad_norm = math.sqrt(sum(_clip(g, schedule.max_grad_norm) ** 2 for g in groups))
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                last = f"{checkpoint} (step {last_saved})" if last_saved else "none yet"
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                raise NonFiniteLossError(
                    f"{name} step {step + 1}: the {what} is {loss_value if what == 'loss' else grad_norm}; stopped "
                    f"without applying it. Last good checkpoint: {last}. Lower the learning rate or check the data, "
                    "then rerun to resume"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += step_tokens
            seconds += time.perf_counter() - t0
            history.append(
                {
                    "step": step + 1,
                    "tokens": tokens,
                    "loss": loss_value,
                    "lr": step_lr,
                    "grad_norm": grad_norm,
                    "seconds": round(seconds, 3),
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
            done = step + 1 == steps
            if done or (step + 1) % checkpointing.every == 0:
                save_checkpoint(checkpoint, model, optimizer, step + 1, history, checkpointing.key, dist, done)
                last_saved = step + 1
            if on_step is not None:
                on_step(name, step + 1)
    finally:
        bar.close()
    model.eval()
    problem = unusable(history, ())  # the loss only: the same on every process; parameters are checked on reuse
    if problem:
        raise ConversionError(
            f"{name} {problem}; lower the learning rate or check the data, then rerun with --no-resume"
        )
    return StageResult(name, steps, tokens, seconds, history)


# --- loss curves ----------------------------------------------------------------------------------------------------


def write_loss_csv(result: StageResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "tokens", "loss", "lr", "grad_norm", "seconds"])
        writer.writeheader()
        writer.writerows(result.history)


def plot_loss_curves(results: Sequence[StageResult], path: Path, title: str = "") -> bool:
    """One panel per stage with a history; False (and no file) without matplotlib."""
    results = [r for r in results if r.history]
    if not results:
        return False
    plt = pyplot()
    if plt is None:
        logger.warning("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, result in zip(axes[0], results):
        ax.plot([h["step"] for h in result.history], [h["loss"] for h in result.history])
        ax.set_title(result.name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log" if min(h["loss"] for h in result.history) > 0 else "linear")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
