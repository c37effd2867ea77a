"""`Recipe`: every setting of a conversion, with LoLCATs' defaults but two that keep in-context recall.

Each field carries its command-line help in its metadata (`setting`), so `hf-based convert` and `hf-based demo`
generate their recipe flags from the dataclass: one place for a setting's name, default, choices and help.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from hf_based.errors import ConversionError

if TYPE_CHECKING:  # imported where used: the command line reads the recipe's fields without torch
    from hf_based.training import Schedule

FEATURE_MAPS = ("hedgehog", "taylor")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# How `softmax_layers = "STRATEGY:K"` picks its K layers (layer_selection.py); "auto" is the default strategy, kl.
SELECTION_STRATEGIES = {"auto": "kl", "kl": "kl", "copy": "copy", "mse": "mse"}
# Settings that do not change a stage's result (budgets enter resume keys as resolved step counts; a block index only
# says which block one process trains), and those that stage 2 alone uses.
NOT_RESULT_SETTINGS = (
    "epochs",
    "stage2_epochs",
    "stage1_steps",
    "stage1_tokens",
    "stage2_steps",
    "stage2_tokens",
    "checkpoint_every",
    "block_index",
    "gradient_checkpointing",
)
STAGE2_SETTINGS = (
    "stage2_lr",
    "stage2_loss",
    "distill_temperature",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "fsdp",
)
SOFTMAX_LAYERS_FORMS = (
    "layer indices I,J,... (negative: from the end; empty: none), or STRATEGY:K (K layers, an integer >= 0) or "
    "STRATEGY:P% (P% of the model's layers, rounded down; 0 < P <= 100) with STRATEGY auto, kl, copy or mse"
)
# Where this recipe's defaults differ from LoLCATs': every layer converted, window factor 0.1, no sinks, the linear
# term at weight 1, no retrieval keys, LoRA for 2 epochs. Recipe(**LOLCATS) is LoLCATs' recipe.
LOLCATS = {
    "softmax_layers": (),
    "window_factor_init": 0.1,
    "sinks": 0,
    "linear_factor_init": None,
    "retrieval_keys": 0,
    "stage2_epochs": 2.0,
}
# Settings of the released LoLCATs checkpoints that their .pt files do not store.
LOLCATS_WINDOW = 64  # window_size of the released configs (e.g. distill_llama3_1_8b_lk_smd_wtk64_fd64_w01.yaml)
LOLCATS_LORA_ALPHA = 16.0  # finetune_lora_qkvo_alpaca_clean.yaml: r=8, lora_alpha=16 (alpha is not in the .pt)
_COUNT = re.compile(r"-?\d+", re.ASCII)
_PERCENT = re.compile(r"-?(\d+(?:\.\d*)?|\.\d+)%", re.ASCII)


@dataclass(frozen=True)
class SelectionSpec:
    """A parsed selection spec: "STRATEGY:K" (count K) or "STRATEGY:P%" (percent P of the model's layers)."""

    strategy: str  # kl, copy or mse ("auto" is kl)
    count: int | None = None
    percent: Fraction | None = None

    def size(self, num_layers: int) -> int:
        """K for a model of `num_layers` layers: the count, or floor(P / 100 x num_layers)."""
        return self.count if self.percent is None else math.floor(self.percent * num_layers / 100)


def parse_layer_selection(spec: str) -> SelectionSpec:
    """A selection spec -> SelectionSpec, e.g. "kl:2" -> (kl, count 2), "copy:20%" -> (copy, percent 20); "auto" names
    the default strategy, kl. ConversionError naming the spec and the accepted forms when it is none."""
    strategy, colon, k = spec.partition(":")
    strategy, k = strategy.strip(), k.strip()

    def refuse(reason: str | None = None):
        why = f" ({reason})" if reason else ""
        return ConversionError(f"softmax_layers={spec!r} is not supported{why}; accepted: {SOFTMAX_LAYERS_FORMS}")

    if not colon:
        raise refuse()
    if strategy not in SELECTION_STRATEGIES:
        raise refuse(f"unknown strategy {strategy!r}")
    strategy = SELECTION_STRATEGIES[strategy]
    if k.endswith("%"):
        if not _PERCENT.fullmatch(k):
            raise refuse("P is missing" if k == "%" else "P is not a number")
        percent = Fraction(k[:-1])
        if not 0 < percent <= 100:
            raise refuse("P must be > 0" if percent <= 0 else "P must be <= 100")
        return SelectionSpec(strategy, percent=percent)
    if not _COUNT.fullmatch(k):
        raise refuse("K is missing" if not k else "K is not an integer")
    if int(k) < 0:
        raise refuse("K must be >= 0")
    return SelectionSpec(strategy, count=int(k))


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def setting(default, help: str, group: str, **argparse_kwargs):
    """A Recipe field: its default, and for the command line its help, argument group and any argparse keywords
    (choices, metavar, exclusive: the name of a mutually exclusive group within `group`)."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **argparse_kwargs})


@dataclass
class Recipe:
    """Every setting of a conversion. Defaults follow LoLCATs (Zhang et al., 2024): window 64, hedgehog maps with
    64 -> 128 features; stage 1 lr 1e-2 with MSE x 1000, stage 2 LoRA r 8 / alpha 16 on q/k/v/o at lr 1e-4; packed
    1024-token sequences, batch 1 x 8 accumulation, 2 epochs per stage, clip 1.0. Four differ, for in-context recall:
    20% of the layers (those copying depends on, "copy:20%") stay softmax attention; the converted layers have no
    linear term but 64 attention sinks and 256 retrieval keys: each is sliding-window softmax over its window, the
    first 64 tokens and, in generation, the prompt keys its last queries attend to most, so stage 1 has nothing to
    train; and no LoRA stage, which cost passkey retrieval (LoLCATs: every layer converted, window factor 0.1, the
    linear term over all older keys, 2 epochs of LoRA; `Recipe(**LOLCATS)`). On SmolLM2-135M the linear term is what
    ended needle retrieval at the training length. Give stage 2 a budget (steps, tokens or epochs) to train LoRA."""

    # LoLCATs' window_size counts the same keys
    window: int = setting(64, "softmax window in keys, the current one included", "architecture")
    feature_map: str = setting("hedgehog", "linear-attention feature map", "architecture", choices=FEATURE_MAPS)
    hedgehog_dim: int = setting(64, "hedgehog W columns; features = 2x this", "architecture")
    softmax_layers: tuple[int, ...] | str = setting(
        "copy:20%",
        'layers kept as full softmax attention: indices (negative: from the end; "": none, every layer converted), '
        "or STRATEGY:K or STRATEGY:P% to keep the K layers, or P% of the model's layers rounded down, that linearize "
        "worst, measured before training: kl (auto's strategy) = those whose restoring lowers the KL to the teacher's "
        "next-token distribution most, copy = the same on text that repeats itself (in-context recall), mse = the "
        "largest attention-transfer error. Why the default: on SmolLM2-135M, keeping the 6 layers that copying depends "
        "on, with --window-factor-init 0.9, took needle retrieval at 256-1024 tokens from 0 to 0.9 and LAMBADA "
        "perplexity from 5.9x to 1.35x the teacher's (see --linear-factor-init for what keeps it at longer prompts). "
        "The layers are measured on the conversion without sinks and with the linear term (LoLCATs' hybrid). "
        'LoLCATs\' recipe: --softmax-layers "" --window-factor-init 0.1 --sinks 0 --linear-factor-init none --retrieval-keys 0 '
        "--stage2-epochs 2",
        "architecture",
        metavar="I,J,...|STRATEGY:K|STRATEGY:P%",
    )
    sinks: int = setting(
        64,
        "attention sinks: the first N tokens of each sequence stay in every converted layer's softmax part however old "
        "they are, instead of entering its linear state (the cache keeps their keys and values)",
        "architecture",
        metavar="N",
    )
    retrieval_keys: int = setting(
        256,
        "keys each converted layer keeps from a prompt in generation besides its window and sinks: the N older keys "
        "that the prompt's last 8 queries attend to most (a setting of the saved model, "
        "`hybrid_retrieval_keys`, that training does not see). Why the default: on SmolLM2-135M, passkey retrieval at "
        "256 / 1024 tokens was 0.2 / 0 without them and 0.8 / 0.3 with 256 (0.9 / 0.8 without the LoRA stage; teacher "
        "0.9 / 0.7)",
        "architecture",
        metavar="N",
    )
    linear_only: bool = setting(False, "pure linear attention, no sliding window", "architecture")
    window_factor_init: float = setting(
        0.9,
        "initial window factor (the softmax window's weight); 0.9 rather than LoLCATs' 0.1: a window that weighs most "
        "from the start keeps in-context recall (see --softmax-layers)",
        "architecture",
    )
    linear_factor_init: float | None = setting(
        0.0,
        "initial weight of the linear part (a learned per-head factor on phi(q), like the window factor); none: no "
        "such factor, the linear part weighs 1 (LoLCATs); 0: no linear part, each converted layer is its window and "
        "sinks alone (no feature maps, nothing for stage 1 to train). Why the default: on SmolLM2-135M with 64 sinks, "
        "needle retrieval at 256 / 1024 / 2048 / 4096 tokens was 1.0 / 0.9 / 0.9 / 0.7 without the linear part and "
        "0.9 / 1.0 / 0.1 / 0 with it (teacher 0.9 / 1.0 / 1.0 / 1.0)",
        "architecture",
    )

    seq_len: int = setting(1024, "packed sequence length", "data")
    batch_size: int = setting(1, "sequences per micro-batch and process", "data")
    grad_accum: int = setting(8, "micro-batches per step", "data")
    epochs: float = setting(2.0, "passes of stage 1 when no steps/tokens are given", "data")
    seed: int = setting(0, "seed of the initialisation and the data order", "data")

    stage1_steps: int | None = setting(
        None, "stage 1 optimizer steps, 0 skips it; none: --epochs passes", "training", exclusive="stage1"
    )
    stage1_tokens: int | None = setting(None, "stage 1 budget in tokens", "training", exclusive="stage1")
    stage1_lr: float = setting(1e-2, "attention-transfer learning rate", "training")
    mse_factor: float = setting(1000.0, "stage-1 loss scale", "training")
    stage2_steps: int | None = setting(
        None, "stage 2 optimizer steps, 0 skips it; none: --stage2-epochs passes", "training", exclusive="stage2"
    )
    stage2_tokens: int | None = setting(None, "stage 2 budget in tokens", "training", exclusive="stage2")
    stage2_epochs: float = setting(
        0.0,
        "passes of stage 2 when no steps/tokens are given; 0: no LoRA. Why the default: on SmolLM2-135M, 100 LoRA "
        "steps on Alpaca took passkey retrieval at 256 / 1024 / 2048 tokens from 0.9 / 0.8 / 0.4 to 0.8 / 0.3 / 0 "
        "(teacher 0.9 / 0.7 / 0.3), and the converted layers without it score LAMBADA as the teacher does (1.00x "
        "perplexity) and 99.6% of its zero-shot average",
        "training",
    )
    stage2_lr: float = setting(1e-4, "LoRA learning rate", "training")
    stage2_loss: str = setting(
        "next_token",
        "next-token cross-entropy, or KL to the teacher's logits",
        "training",
        choices=("next_token", "distill"),
    )
    distill_temperature: float = setting(1.0, "softmax temperature of --stage2-loss distill", "training")
    lora_r: int = setting(8, "LoRA rank", "training")
    lora_alpha: float = setting(16.0, "LoRA alpha", "training")
    lora_dropout: float = setting(0.0, "LoRA dropout", "training")
    lora_targets: tuple[str, ...] = setting(
        LORA_TARGETS, "comma-separated projections that get LoRA", "training", metavar="NAMES"
    )
    weight_decay: float = setting(0.0, "AdamW weight decay", "training")
    max_grad_norm: float = setting(1.0, "gradient clipping norm", "training")
    warmup_steps: int = setting(0, "linear learning-rate warm-up steps", "training")
    lr_schedule: str = setting(
        "constant",
        "after warm-up: constant, or cosine decay to 10% of the peak",
        "training",
        choices=("constant", "cosine"),
    )

    checkpoint_every: int = setting(50, "steps between checkpoints", "run")
    blockwise: int | None = setting(
        None, "block-wise attention transfer with blocks of this many layers", "run", metavar="LAYERS"
    )
    block_index: int | None = setting(None, "with --blockwise: train only this block, then stop", "run")
    fsdp: bool = setting(False, "stage 2 with FSDP2 in a multi-process (accelerate) run", "run")
    gradient_checkpointing: bool = setting(False, "stage 2: recompute activations", "training")
    precision: str | None = setting(
        None, "compute precision (default: bf16 on CUDA, fp32 elsewhere)", "training", choices=("bf16", "fp32")
    )

    @property
    def layer_selection(self) -> SelectionSpec | None:
        """The parsed spec when `softmax_layers` is a selection spec such as "kl:2" or "copy:20%", else None."""
        return parse_layer_selection(self.softmax_layers) if isinstance(self.softmax_layers, str) else None

    def validate(self) -> None:
        """ConversionError naming the first setting that cannot be used, and what is accepted."""
        if isinstance(self.softmax_layers, str):
            parse_layer_selection(self.softmax_layers)

        def check(name: str, ok: Callable[[object], bool], accepted: str) -> None:
            value = getattr(self, name)
            if not ok(value):
                raise ConversionError(f"{name}={value!r} is not supported; accepted: {accepted}")

        for name in ("window", "hedgehog_dim", "seq_len", "batch_size", "grad_accum", "lora_r", "checkpoint_every"):
            check(name, lambda v: is_int(v) and v >= 1, "integers >= 1")
        for name in ("stage1_steps", "stage1_tokens", "stage2_steps", "stage2_tokens", "block_index"):
            check(name, lambda v: v is None or (is_int(v) and v >= 0), "integers >= 0")
        check("blockwise", lambda v: v is None or (is_int(v) and v >= 1), "integers >= 1")
        for stage in (1, 2):  # steps would win silently over tokens
            steps, tokens = getattr(self, f"stage{stage}_steps"), getattr(self, f"stage{stage}_tokens")
            if steps is not None and tokens is not None:
                raise ConversionError(
                    f"stage{stage}_steps={steps!r} and stage{stage}_tokens={tokens!r} both set; accepted: one of them"
                )
        for name in ("warmup_steps", "sinks", "retrieval_keys"):
            check(name, lambda v: is_int(v) and v >= 0, "integers >= 0")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices:
                check(
                    f.name,
                    lambda v, choices=choices, f=f: v in choices or (v is None and f.default is None),
                    ", ".join(choices),
                )
        check("window_factor_init", lambda v: is_number(v) and 0 < v < 1, "0 < value < 1")
        check("linear_factor_init", lambda v: v is None or (is_number(v) and 0 <= v < 1), "none or 0 <= value < 1")
        for name in ("stage1_lr", "stage2_lr", "epochs", "mse_factor", "lora_alpha", "distill_temperature"):
            check(name, lambda v: is_number(v) and v > 0, "a number > 0")
        check("stage2_epochs", lambda v: is_number(v) and v >= 0, "a number >= 0 (0: no LoRA)")
        check("max_grad_norm", lambda v: is_number(v) and v > 0, "a number > 0 (the gradient norm clipped to)")
        check("weight_decay", lambda v: is_number(v) and v >= 0, "a number >= 0")
        check("lora_dropout", lambda v: is_number(v) and 0 <= v < 1, "0 <= value < 1")
        check(
            "lora_targets", lambda v: v and all(t in LORA_TARGETS for t in v), f"a subset of {', '.join(LORA_TARGETS)}"
        )
        if not self.linear_only and self.window >= self.seq_len:
            raise ConversionError(
                f"window={self.window} >= seq_len={self.seq_len}: the softmax window covers every training sequence, "
                "so attention transfer has nothing to learn; accepted: window < seq_len (or linear_only)"
            )
        if self.block_index is not None and self.blockwise is None:
            raise ConversionError("block_index needs blockwise (layers per block)")

    def settings_of_stage(self, stage: int) -> dict:
        """The settings that change what stage 1 or 2 computes (stage 2's include stage 1's), for resume keys; the
        budgets enter as step counts, by the caller."""
        stage2_only = () if stage == 2 else STAGE2_SETTINGS
        return {k: v for k, v in self.to_dict().items() if k not in NOT_RESULT_SETTINGS + stage2_only}

    def schedule(self, stage: int, steps: int) -> Schedule:
        """The optimisation schedule of stage 1 (attention transfer) or 2 (LoRA) over `steps` optimizer steps."""
        from hf_based.training import Schedule

        lr = self.stage1_lr if stage == 1 else self.stage2_lr
        return Schedule(steps, self.grad_accum, lr, self.warmup_steps, self.lr_schedule, self.max_grad_norm)

    def selection_probe(self) -> Recipe:
        """The untrained conversion on which a STRATEGY:K spec measures the layers: every layer converted, without
        sinks and with the linear term at weight 1, whatever this recipe's sinks and linear factor. On SmolLM2 the
        copy criterion measured so picks the layers that kept recall (0, 17-20, 23); measured with 64 sinks and no
        linear term, most layers barely matter alone and it picks others (7, 14, 17, 18, 20, 23)."""
        return dataclasses.replace(self, softmax_layers=(), sinks=0, linear_factor_init=None)

    def with_softmax_layers(self, layers: tuple[int, ...] | list[int]) -> Recipe:
        """This recipe with explicit softmax layers (a selection spec resolved, or none)."""
        return dataclasses.replace(self, softmax_layers=tuple(layers))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping) -> Recipe:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ConversionError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)
