"""What `hf-based mqar` sweeps: Zoology's MQAR task constraints, the model families and their specs (`ModelSpec`),
the training and test settings (`Settings`) and the named sweeps (`SWEEPS`). Plain data: the command line lists
them without importing torch; `hf_based.bench.mqar` trains and scores them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_based.modeling import BasedConfig

VOCAB_SIZE = 8192
POWER_A = 0.01
MAX_SEED = 2**56


def check_task(seq_len: int, num_kv_pairs: int, vocab_size: int) -> None:
    """Zoology's constraints on an MQAR task; ValueError naming the bad argument."""
    for name, value in (("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (keys and values come in pairs), got {seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"num_kv_pairs={num_kv_pairs} does not fit seq_len={seq_len}: the pairs and their queries need "
            f"4 * num_kv_pairs <= seq_len"
        )
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size must exceed seq_len, got vocab_size={vocab_size}, seq_len={seq_len}")


# ---------------------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class Family:
    label: str
    mixer: str
    conv: bool
    marker: str
    color: str


FAMILIES = {
    "attention": Family("attention", "full_attention", True, "o", "C0"),
    "sliding_window": Family("sliding window", "sliding_window_attention", True, "s", "C1"),
    "based": Family("BASED (conv + Taylor)", "linear_attention", True, "*", "C2"),
    "based_no_conv": Family("BASED without conv", "linear_attention", False, "X", "C3"),
    "lolcats": Family("LoLCATs hybrid (window + hedgehog)", "hybrid_attention", True, "D", "C4"),
}


@dataclass(frozen=True)
class ModelSpec:
    """One model of the sweep. feature_dim: Taylor q/k size (BASED families); window: keys a query sees, itself
    included (sliding window, LoLCATs); hedgehog_dim: LoLCATs' feature map gives 2 * hedgehog_dim features."""

    family: str
    d_model: int
    feature_dim: int | None = None
    window: int | None = None
    hedgehog_dim: int = 64

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not supported; accepted values: {', '.join(FAMILIES)}")

    @property
    def name(self) -> str:
        name = f"{self.family}-d{self.d_model}"
        if self.family in ("based", "based_no_conv"):
            name += f"-f{self.feature_dim}"
        if self.family == "lolcats":
            name += f"-h{self.hedgehog_dim}"
        if self.window is not None:
            name += f"-w{self.window}"
        return name

    def config(self, vocab_size: int, max_len: int) -> BasedConfig:
        from hf_based.modeling import BasedConfig

        family = FAMILIES[self.family]
        block = ["base_conv", family.mixer] if family.conv else [family.mixer]
        extra = {}
        if self.feature_dim is not None:
            extra["feature_dim"] = self.feature_dim
        if self.family == "lolcats":
            extra.update(feature_map="hedgehog", hedgehog_dim=self.hedgehog_dim)
        return BasedConfig(
            vocab_size=vocab_size,
            hidden_size=self.d_model,
            num_hidden_layers=2 * len(block),
            num_attention_heads=1,
            mixer_types=2 * block,
            sliding_window=self.window or max_len,
            max_position_embeddings=max_len,
            bos_token_id=None,
            eos_token_id=None,
            use_cache=False,
            **extra,
        )


# ---------------------------------------------------------------------------------------------------------------
# Sweeps


@dataclass(frozen=True)
class Task:
    seq_len: int
    num_kv_pairs: int

    @property
    def name(self) -> str:
        return f"{self.seq_len}x{self.num_kv_pairs}"


@dataclass(frozen=True)
class Settings:
    train_tasks: tuple[Task, ...]
    test_tasks: tuple[Task, ...]
    vocab_size: int = VOCAB_SIZE
    batch_size: int = 256
    test_examples: int = 1000
    max_steps: int = 4000
    warmup_steps: int = 50
    lr: float = 3e-3
    weight_decay: float = 0.1
    time_budget_s: float | None = None  # the whole sweep's training + evaluation; None: max_steps per run
    train_weights: tuple[int, ...] | None = None  # examples per training task, relative (None: one each)
    lrs: tuple[float, ...] = ()  # learning rates to sweep, the best kept per model (empty: just `lr`)
    early_stop_accuracy: float = 0.99
    check_every: int = 50
    power_a: float = POWER_A
    random_non_queries: bool = True
    seed: int = 0

    def __post_init__(self):
        for task in self.train_tasks + self.test_tasks:
            check_task(task.seq_len, task.num_kv_pairs, self.vocab_size)
        for name in ("batch_size", "test_examples", "max_steps", "check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for lr in (self.lr, *self.lrs):
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"lr must be > 0 and finite, got {lr}")
        weights = self.train_weights
        if weights is not None and (len(weights) != len(self.train_tasks) or min(weights) < 1):
            raise ValueError(
                f"train_weights must give each of the {len(self.train_tasks)} training tasks a count >= 1, got "
                f"{list(weights)}"
            )
        if not abs(self.seed) <= MAX_SEED:  # runs derive seeds up to ~100x this one; torch takes 64-bit seeds
            raise ValueError(f"seed must be an integer from {-MAX_SEED} to {MAX_SEED}, got {self.seed}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 (or None for no budget), got {self.time_budget_s}")

    @property
    def headline(self) -> Task:
        """The task the main plot shows: the longest test sequence with the most pairs."""
        return max(self.test_tasks, key=lambda t: (t.seq_len, t.num_kv_pairs))

    @property
    def learning_rates(self) -> tuple[float, ...]:
        return self.lrs or (self.lr,)

    @property
    def training_cycle(self) -> list[Task]:
        """The training tasks in the order steps draw them: each `train_weights` times (their ratio reduced), so
        that the tasks come in the proportions of a dataset with those counts."""
        weights = self.train_weights or (1,) * len(self.train_tasks)
        unit = math.gcd(*weights)
        return [task for task, weight in zip(self.train_tasks, weights) for _ in range(weight // unit)]

    def train_task(self, step: int) -> Task:
        """The training task of `step`: the training cycle, repeated."""
        cycle = self.training_cycle
        return cycle[step % len(cycle)]

    @property
    def max_len(self) -> int:
        return max(t.seq_len for t in self.train_tasks + self.test_tasks)

    def fingerprint(self) -> str:
        """Identifies the settings that shape the results: runs are resumed only under the same fingerprint."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def tasks(*pairs) -> tuple[Task, ...]:
    return tuple(Task(*pair) for pair in pairs)


QUICK_TASKS = tasks((64, 4), (128, 8), (256, 16), (256, 32), (512, 64))
# The BASED paper's Figure 2 (HazyResearch/zoology, arxiv24_based_figure2): 100k examples of (64, 4) and 20k of each
# longer task, 32 epochs of batches of 256 (180k * 32 / 256 = 22,500 steps), the best of 4 learning rates; tested up
# to (1024, 256).
PAPER_TRAIN = tasks((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))
PAPER_TEST = tasks((64, 4), (128, 8), (256, 16), (256, 32), (256, 64), (512, 64), (512, 128), (1024, 128), (1024, 256))
SWEEPS = {
    # One H200, < 8 minutes: 23 runs sharing a 400 s budget for training, kernel compilation and evaluation.
    "quick": (
        Settings(train_tasks=QUICK_TASKS, test_tasks=QUICK_TASKS, time_budget_s=400.0),
        [ModelSpec("attention", d) for d in (64, 128)]
        + [ModelSpec("sliding_window", 128, window=w) for w in (8, 16, 32, 64, 128, 256)]
        + [ModelSpec("based", d, feature_dim=f) for d in (48, 64, 128) for f in (8, 16, 24)]
        + [ModelSpec("based_no_conv", 128, feature_dim=f) for f in (8, 16, 24)]
        + [ModelSpec("lolcats", d, window=w) for d, w in ((64, 16), (128, 16), (128, 64))],
    ),
    # Trained to convergence as in the paper: 22 models x 4 learning rates (early stop at 99% training accuracy).
    "based-paper": (
        Settings(
            train_tasks=PAPER_TRAIN,
            test_tasks=PAPER_TEST,
            train_weights=(100, 20, 20, 20, 20),
            max_steps=22_500,
            warmup_steps=500,
            lrs=tuple(10 ** (-3 + 0.5 * i) for i in range(4)),  # logspace(-3, -1.5, 4)
            check_every=250,
        ),
        [ModelSpec("attention", d) for d in (64, 128)]
        + [ModelSpec("sliding_window", 128, window=w) for w in (8, 16, 32, 64, 128, 256, 512, 1024)]
        + [ModelSpec("based", d, feature_dim=f) for d in (48, 64, 128) for f in (8, 16, 24)]
        + [ModelSpec("lolcats", d, window=w) for d, w in ((64, 16), (128, 16), (128, 64))],
    ),
    # CPU tests: about a minute on 2 cores.
    "tiny": (
        Settings(
            train_tasks=tasks((64, 4), (64, 8)),
            test_tasks=tasks((64, 4), (64, 8)),
            vocab_size=128,
            batch_size=32,
            test_examples=128,
            max_steps=200,
            warmup_steps=20,
            lr=1e-2,
            check_every=25,
        ),
        [ModelSpec("attention", 32), ModelSpec("based", 32, feature_dim=8)],
    ),
}


def settings_from_dict(data: dict) -> Settings:
    data = dict(data)
    for key in ("train_tasks", "test_tasks"):
        data[key] = tuple(Task(**task) for task in data[key])
    for key in ("train_weights", "lrs"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return Settings(**data)
