"""`convert()`: the whole LoLCATs conversion of a Llama-family checkpoint, from teacher to saved BASED checkpoint.

1. Linearize: the teacher's weights in a BasedForCausalLM whose attention layers are `hybrid_attention` (or pure
   `linear_attention`), except the layers kept as softmax `full_attention`: given, or measured on the first training
   sequences before stage 1 ("kl:K", or "copy:20%" by default: `layer_selection.py`) and fixed for the whole run.
2. Stage 1, attention transfer: everything frozen but the feature maps and window factors; loss = per-layer MSE
   between the converted and the teacher's softmax attention output before o_proj, on the teacher's hidden states
   (`linearize.AttentionTransfer`), averaged over layers x 1000. Joint, or block-wise (`blockwise.py`).
3. Stage 2: LoRA (peft) on q/k/v/o of the converted layers with the next-token loss (or distillation to the
   teacher's logits); single process, DDP, or FSDP2 when launched with `accelerate launch`.
4. Assemble: stage-1 parameters + merged LoRA (`merge_and_unload`) into a plain BasedForCausalLM; save it with
   `save_pretrained` (safetensors, remote code), the tokenizer, the generation config, a model card, the loss
   curves (CSV + PNG) and `conversion.json`.

Every stage checkpoints to OUT/checkpoints and a rerun of the same command resumes where it stopped; a checkpoint
whose settings (every one that changes the result, and the training data's content) differ is refused. The model is
written to a staging directory and moved into OUT whole (`hf_based.outputs.model_directory`): a failed run leaves OUT
as it was, and a finished model is replaced only with `overwrite`, or by a rerun with identical settings. `convert()`
runs the stages as functions that can be called one by one: `load_inputs`, `plan_stages`, `stage1_attention_transfer`,
`stage2_lora`, `save_artifacts`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hf_based import __version__
from hf_based.conversion.blockwise import run_blockwise_stage1
from hf_based.conversion.data import (
    IGNORE_INDEX,
    PackedData,
    global_order,
    load_training_data,
    teacher_generated_text,
)
from hf_based.conversion.layer_selection import (
    CALIBRATION_SEQUENCES,
    CRITERIA,
    LayerSelection,
    check_selection_size,
    select_softmax_layers,
)
from hf_based.conversion.linearize import (
    AttentionTransfer,
    based_config,
    check_teacher_weights,
    converted_layers,
    distillation_loss,
    layer_attention_mse,
    linearize_model,
    lora_config,
    stage1_optimizer,
    stage1_parameters,
)
from hf_based.conversion.options import DataOptions, EvalOptions, check_options
from hf_based.conversion.recipe import Recipe
from hf_based.conversion.teacher import load_teacher
from hf_based.errors import ConversionError, UsageError
from hf_based.eval.lm_eval_tasks import evaluate, split_tasks
from hf_based.modeling import BasedConfig, BasedForCausalLM
from hf_based.outputs import check_output_directory, is_model_directory, model_directory
from hf_based.progress import progress_phase
from hf_based.training import (
    Checkpointing,
    Dist,
    StageResult,
    atomic_save,
    autocast_for,
    differing_settings,
    plot_loss_curves,
    read_checkpoint,
    train,
    uses_bf16,
    write_loss_csv,
)
from hf_based.utils import format_number, torch_dtype

logger = logging.getLogger(__name__)


@dataclass
class ConversionResult:
    out: Path
    model: BasedForCausalLM | None  # the converted model (main process), on the training device, in eval mode
    tokenizer: object
    recipe: Recipe
    stages: dict[str, StageResult]
    metrics: dict = field(default_factory=dict)  # validation losses, throughput
    eval_results: dict | None = None
    teacher_eval_results: dict | None = None
    info: dict = field(default_factory=dict)  # what conversion.json holds


def resolve_steps(
    steps: int | None, tokens: int | None, epochs: float, num_sequences: int, global_batch: int, seq_len: int
) -> int:
    """Optimizer steps of a stage: given, from a token budget, or `epochs` passes over the training sequences (at least
    one step unless `epochs` is 0)."""
    if steps is not None:
        return steps
    if tokens is not None:
        return math.ceil(tokens / (global_batch * seq_len))
    return max(1, math.ceil(epochs * num_sequences / global_batch)) if epochs else 0


def batch_indices(order: torch.Tensor, step: int, micro: int, recipe: Recipe, dist: Dist) -> torch.Tensor:
    """The sequences of micro-batch `micro` of optimizer step `step` on this process."""
    start = ((step * recipe.grad_accum + micro) * dist.world + dist.rank) * recipe.batch_size
    return order[start : start + recipe.batch_size]


def _digest(value) -> str:
    if isinstance(value, dict):  # a config: its architecture, not where it was loaded from
        value = {k: v for k, v in value.items() if not k.startswith("_") and k not in ("transformers_version", "dtype")}
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_digest(data: PackedData) -> str:
    """The training data by its content (token ids and loss labels), not by where it was read from."""
    digest = hashlib.sha256()
    for tensor in (data.input_ids, data.labels):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_digest(model: torch.nn.Module, samples: int = 4096) -> str:
    """The model's weights by content: each tensor's name, shape and dtype and up to `samples` evenly spaced values.
    A sample, not every byte, so that an 8B teacher is fingerprinted in moments; any retraining or other checkpoint
    changes the sampled values too."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().flatten()
        picked = flat[:: max(1, flat.numel() // samples)][:samples]
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(picked.to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]


# --- stage 1 --------------------------------------------------------------------------------------------------------


def attention_mse(
    model: BasedForCausalLM,
    input_ids: torch.Tensor,
    factor: float = 1.0,
    batch_size: int = 1,
    autocast=contextlib.nullcontext,
) -> float:
    """The stage-1 loss on `input_ids`: per-layer MSE to the teacher's attention, averaged over layers, x factor."""
    per_layer = layer_attention_mse(model, input_ids, batch_size, autocast)
    return sum(per_layer.values()) / len(per_layer) * factor if per_layer else 0.0


def run_stage1(
    student,
    recipe: Recipe,
    train_data: PackedData,
    steps: int,
    dist: Dist,
    checkpoint: Path,
    key: dict,
    progress: bool = True,
    on_step=None,
) -> StageResult:
    """Joint attention transfer over all converted layers, on `train_data` token chunks."""
    config = student.config
    torch.manual_seed(recipe.seed)
    groups, optimizer = stage1_optimizer(student, config, recipe)
    params = [p for group in groups.values() for p in group]
    global_batch = recipe.batch_size * recipe.grad_accum * dist.world
    order = global_order(len(train_data), steps * global_batch, recipe.seed)
    modules = {i: student.model.layers[i].self_attn for i in groups}
    num_layers = len(converted_layers(config))
    autocast = autocast_for(dist.device, recipe.precision)

    def loss_fn(step, micro):
        ids = train_data.input_ids[batch_indices(order, step, micro, recipe, dist)].to(dist.device)
        with AttentionTransfer(modules) as transfer, autocast():
            student.model(input_ids=ids, use_cache=False)
        return transfer.loss(num_layers, recipe.mse_factor), ids.numel() * dist.world

    return train(
        "stage 1 attention transfer",
        student,
        optimizer,
        loss_fn,
        recipe.schedule(1, steps),
        Checkpointing(checkpoint, key, recipe.checkpoint_every),
        dist,
        clip_groups=list(groups.values()),
        sync_grads=lambda: dist.all_reduce_grads(params),
        progress=progress,
        on_step=on_step,
    )


# --- stage 2 --------------------------------------------------------------------------------------------------------


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels[:, 1:]
    if not (targets != IGNORE_INDEX).any():  # a chunk of prompt tokens only: nothing to learn, no NaN
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def _shard_fsdp(peft_model, student, use_bf16: bool) -> None:
    """FSDP2 (torch fully_shard): each decoder layer is a unit, the rest the root unit; bf16 compute on CUDA."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if use_bf16
        else (MixedPrecisionPolicy())
    )
    for layer in student.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(peft_model, mp_policy=policy)


def run_stage2(
    student,
    recipe: Recipe,
    train_data: PackedData,
    steps: int,
    dist: Dist,
    checkpoint: Path,
    key: dict,
    teacher=None,
    progress: bool = True,
    on_step=None,
) -> StageResult:
    """LoRA fine-tuning of the converted layers' q/k/v/o; feature maps and window factors frozen (LoLCATs stage 2)."""
    from peft import get_peft_model

    student.requires_grad_(False)
    torch.manual_seed(recipe.seed)  # LoRA's A init and anything random in stage 2: the same in every run
    peft_model = get_peft_model(student, lora_config(recipe, student.config))
    if recipe.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.enable_input_require_grads()
    autocast = autocast_for(dist.device, recipe.precision)
    model = peft_model
    if dist.world > 1 and recipe.fsdp:
        _shard_fsdp(peft_model, student, uses_bf16(dist.device, recipe.precision))
        autocast = contextlib.nullcontext  # FSDP's mixed-precision policy casts instead
        mode = "FSDP2"
    elif dist.world > 1:
        model = dist.accelerator.prepare(peft_model)
        mode = "DDP"
    if dist.world > 1 and dist.is_main:
        logger.info("stage 2: %s over %d processes", mode, dist.world)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.stage2_lr, weight_decay=recipe.weight_decay)
    global_batch = recipe.batch_size * recipe.grad_accum * dist.world
    order = global_order(len(train_data), steps * global_batch, recipe.seed + 1)
    if recipe.stage2_loss == "distill":
        if teacher is None:
            raise ConversionError("stage2_loss='distill' needs the teacher model")
        teacher.to(dist.device).eval()

    def loss_fn(step, micro):
        idx = batch_indices(order, step, micro, recipe, dist)
        ids = train_data.input_ids[idx].to(dist.device)
        with autocast():
            logits = model(input_ids=ids, use_cache=False).logits
        if recipe.stage2_loss == "distill":
            with torch.no_grad(), autocast():
                teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            loss = distillation_loss(logits, teacher_logits, recipe.distill_temperature)
        else:
            loss = next_token_loss(logits, train_data.labels[idx].to(dist.device))
        return loss, ids.numel() * dist.world

    result = train(
        "stage 2 LoRA",
        model,
        optimizer,
        loss_fn,
        recipe.schedule(2, steps),
        Checkpointing(checkpoint, key, recipe.checkpoint_every),
        dist,
        progress=progress,
        on_step=on_step,
    )
    if recipe.stage2_loss == "distill":
        teacher.to("cpu")
    return result


# --- assembling and saving ------------------------------------------------------------------------------------------


def assemble(
    teacher, recipe: Recipe, stage1_state: dict | None, lora_state: dict | None, device="cpu"
) -> BasedForCausalLM:
    """A plain BasedForCausalLM from the teacher's weights, the trained feature maps and window factors, and the
    merged LoRA."""
    student = linearize_model(teacher, recipe, device=device)
    if stage1_state:
        result = student.load_state_dict(stage1_state, strict=False)
        if result.unexpected_keys:
            raise ConversionError(f"stage-1 checkpoint holds unknown parameters {result.unexpected_keys[:4]}")
    if lora_state:
        from peft import get_peft_model

        peft_model = get_peft_model(student, lora_config(recipe, student.config))
        result = peft_model.load_state_dict(lora_state, strict=False)
        lora_keys = {n for n in peft_model.state_dict() if ".lora_" in n}
        if result.unexpected_keys or lora_keys - set(lora_state):
            raise ConversionError("the stage-2 checkpoint does not match this model's LoRA layers")
        student = peft_model.merge_and_unload()
    student.requires_grad_(False)
    return student.eval()


@torch.no_grad()
def perplexity(
    model,
    data: PackedData,
    device,
    batch_size: int = 1,
    autocast=contextlib.nullcontext,
    max_sequences: int | None = None,
) -> float:
    """exp(mean next-token loss) over all tokens of `data` (prompt tokens included: it measures the model)."""
    model.eval()
    total, count = 0.0, 0
    ids_all = data.input_ids[:max_sequences]
    for ids in ids_all.split(batch_size):
        ids = ids.to(device)
        with autocast():
            logits = model(input_ids=ids, use_cache=False).logits
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def _output_dtype(dtype: str | torch.dtype | None, teacher) -> torch.dtype:
    """The saved weights' dtype: `dtype`, or for "auto" (and None) the teacher's, fp32 if that is not a float."""
    if dtype not in (None, "auto"):
        return torch_dtype(dtype)
    teacher_dtype = torch_dtype(getattr(teacher.config, "dtype", None) or "float32")
    return teacher_dtype if teacher_dtype.is_floating_point else torch.float32


def model_card(info: dict) -> str:
    """README.md of the converted checkpoint: base model, recipe, tokens per stage, final losses, evaluation."""
    recipe = info["recipe"]
    stages = info["stages"]
    layers = info["layers"]
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {info['base_model']}",
        "tags: [based, lolcats, linear-attention, hf-based]",
        "---",
        "",
        f"# {info['name']}",
        "",
        f"`{info['base_model']}` linearized with LoLCATs (Zhang et al., 2024) by "
        f"[hf-based](https://pypi.org/project/hf-based/) {info['hf_based_version']}: "
        f"{layers['converted']} of {layers['total']} attention layers are {_converted_layer_text(recipe)}"
        + (f"; layers {layers['softmax']} keep softmax attention." if layers["softmax"] else "."),
        "",
        "Load it with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`, or import `hf_based` "
        "first. Both need the hf-based package, which is not on PyPI: install it from its source (`pip install -e .` "
        "in a checkout).",
        "",
    ]
    selection = info.get("layer_selection")
    if selection and selection["layers"]:
        lines += [
            "## Softmax layers",
            "",
            f"`--softmax-layers {selection['spec']}` kept layers {selection['layers']} as softmax attention "
            f"({len(selection['layers'])} of {layers['total']}), chosen before training on "
            f"{selection['calibration_sequences']} training sequences: those where {CRITERIA[selection['strategy']]}.",
            "",
            "| layer | score |",
            "|---|---|",
            *(f"| {layer} | {format_number(score)} |" for layer, score in selection["scores"].items()),
            "",
        ]
    elif selection:
        lines += [
            "## Softmax layers",
            "",
            f"`--softmax-layers {selection['spec']}` keeps none of this model's {layers['total']} layers: every "
            "attention layer is converted.",
            "",
        ]
    lines += [
        "## Recipe",
        "",
        "| stage | what trains | steps | tokens | lr | final loss | time | tokens/s (2nd half) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, what in (
        ("stage1", f"feature maps + window weight (attention MSE x {format_number(recipe['mse_factor'])})"),
        (
            "stage2",
            f"LoRA r={recipe['lora_r']} alpha={format_number(recipe['lora_alpha'])} on "
            f"{'/'.join(recipe['lora_targets'])} ({recipe['stage2_loss'].replace('_', '-')})",
        ),
    ):
        s = stages.get(key)
        if not s or s["steps"] == 0:
            lines.append(f"| {key[-1]} | {what} | skipped | 0 | - | - | - | - |")
            continue
        lines.append(
            f"| {key[-1]} | {what} | {s['steps']} | {s['tokens']:,} | {format_number(recipe[key + '_lr'])} | "
            f"{format_number(s['final_loss'])} | {s['seconds']:.0f} s | {format_number(s['tokens_per_second'], 3)} "
            f"({format_number(s.get('steady_tokens_per_second'), 3)}) |"
        )
    lines += [
        "",
        f"Training data: {info['data']} (template: {info['template']}), "
        f"packed into {recipe['seq_len']}-token sequences; "
        f"batch {recipe['batch_size']} x {recipe['grad_accum']} accumulation x {info['world_size']} process(es); "
        f"AdamW, weight decay {recipe['weight_decay']}, gradient clip {recipe['max_grad_norm']}"
        + (", stage 1 block-wise, " + f"{recipe['blockwise']} layers a block" if recipe["blockwise"] else "")
        + ".",
        "",
    ]
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["## Validation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {format_number(v)} |" for k, v in metrics.items()]
        lines.append("")
    evals = info.get("eval")
    if evals:
        base = info.get("teacher_eval") or {}
        lines += [
            "## Evaluation (lm-eval)",
            "",
            f"Limit: {info.get('eval_limit') or 'all'} documents per task.",
            "",
            "| task | metric | teacher | converted |",
            "|---|---|---|---|",
        ]
        for task, values in evals.items():
            for metric, value in values.items():
                teacher_value = format_number(base.get(task, {}).get(metric))
                lines.append(f"| {task} | {metric} | {teacher_value} | {format_number(value)} |")
        lines.append("")
    lines += ["## Recipe (all settings)", "", "```json", json.dumps(recipe, indent=2), "```", ""]
    return "\n".join(lines)


# --- the stages of a conversion -------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What a conversion starts from: the teacher, the converted model's config, the training and validation data,
    and the recipe as run (a softmax-layer selection spec resolved to the layers it chose)."""

    teacher: nn.Module
    tokenizer: object
    base_name: str  # how the model card names the teacher
    config: BasedConfig
    train_data: PackedData
    val_data: PackedData | None
    val_ids: torch.Tensor  # the sequences of the validation attention MSE
    data_name: str
    template: str  # as used; teacher-written text has none
    recipe: Recipe
    layer_selection: LayerSelection | None = None  # when softmax_layers was a spec such as "kl:2" or "copy:20%"


@dataclass
class Plan:
    """Optimizer steps of each stage, and the settings that their checkpoints must match to be resumed."""

    stage1_steps: int
    stage2_steps: int
    stage1_key: dict
    stage2_key: dict


def _log(dist: Dist, message: str, *args) -> None:
    if dist.is_main:
        logger.info(message, *args)


def prepare_output(out: str | Path, resume: bool, overwrite: bool, dist: Dist) -> Path:
    """OUT as a Path. Without `resume`, its checkpoints are deleted, and so is a finished model in it, which needs
    `overwrite` (UsageError otherwise; a resumed run's model is checked against its settings by `check_rerun`)."""
    out = check_output_directory(out, overwrite or resume)
    if not resume and dist.is_main:
        if is_model_directory(out):
            with model_directory(out, overwrite=True):  # nothing staged: the old model's files are removed
                pass
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    dist.barrier()
    return out


def run_settings(plan: Plan, dtype: torch.dtype) -> dict:
    """What a saved model was made with, as conversion.json records it: stage 2's key (which holds stage 1's), the
    step counts and the saved dtype."""
    settings = {**plan.stage2_key, "stage1_steps": plan.stage1_steps, "stage2_steps": plan.stage2_steps}
    return json.loads(json.dumps({**settings, "dtype": str(dtype).removeprefix("torch.")}, default=str))


def check_rerun(out: Path, settings: dict, overwrite: bool) -> None:
    """A finished model in OUT is replaced only with `overwrite`, or by a rerun with identical `settings` (which
    saves the same model again); UsageError otherwise, before any training."""
    if overwrite or not is_model_directory(out):
        return
    try:
        saved = json.loads((out / "conversion.json").read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        saved = None
    differs = differing_settings(settings, saved) if isinstance(saved, dict) else ["not recorded"]
    if differs:
        raise UsageError(
            f"{out} already holds a model converted with other settings ({', '.join(differs)}); pass --overwrite to "
            "replace it, or choose another OUT"
        )


def check_checkpoints(plan: Plan, checkpoints: Path) -> None:
    """Refuse the stage checkpoints of a run with other settings (or unusable) now, rather than after training."""
    for steps, key, name in (
        (plan.stage1_steps, plan.stage1_key, "stage1.pt"),
        (plan.stage2_steps, plan.stage2_key, "stage2.pt"),
    ):
        if steps:
            read_checkpoint(checkpoints / name, key)


def load_inputs(
    base: str | None,
    recipe: Recipe,
    data: DataOptions,
    dist: Dist,
    checkpoints: Path,
    *,
    teacher=None,
    tokenizer=None,
    base_name: str | None = None,
    progress: bool = True,
) -> Inputs:
    """Load the teacher (from `base`, unless given) and the training data; check that the teacher converts; choose
    the softmax layers when the recipe asks for a measured selection ("kl:K", "copy:20%", kept in OUT/checkpoints)."""
    if teacher is None:
        if base is None:
            raise ConversionError("give BASE (a checkpoint directory, hub id or .gguf file) or a loaded teacher")
        _log(dist, "loading teacher %s", base)
        teacher, tokenizer = load_teacher(str(base))
    elif tokenizer is None:
        raise ConversionError("a loaded teacher needs its tokenizer")
    if base_name is None:
        base_name = str(base) if base is not None else getattr(teacher.config, "name_or_path", "") or "teacher"
    teacher.eval().requires_grad_(False)
    selecting = recipe.layer_selection is not None
    unselected = recipe.with_softmax_layers(()) if selecting else recipe  # the spec is resolved after the data loads
    check_teacher_weights(teacher, based_config(teacher.config, unselected))
    if selecting:
        check_selection_size(recipe, teacher.config.num_hidden_layers)
    window = getattr(teacher.config, "sliding_window", None)
    if window and recipe.seq_len > window and getattr(teacher.config, "model_type", "") == "mistral" and dist.is_main:
        logger.warning("the teacher attends within %d tokens; training on %d differs from it", window, recipe.seq_len)

    val_data = None
    if data.from_teacher:
        train_data = _teacher_text(teacher, tokenizer, recipe, data, dist, checkpoints / "teacher_text.pt", progress)
        template = "none (teacher-generated)"
    else:
        train_data, val_data = load_training_data(
            data.sources, tokenizer, recipe.seq_len, data.template, data.val_records, data.max_records
        )
        template = data.template
    if val_data is not None:
        val_data = PackedData(
            val_data.input_ids[: data.val_sequences], val_data.labels[: data.val_sequences], val_data.source
        )
    val_ids = val_data.input_ids if val_data is not None else train_data.input_ids[: data.val_sequences]
    selection = None
    if selecting:
        selection = _layer_selection(teacher, recipe, train_data, dist, checkpoints / "layer_selection.pt", progress)
        recipe = recipe.with_softmax_layers(selection.layers)
    return Inputs(
        teacher,
        tokenizer,
        base_name,
        based_config(teacher.config, recipe),
        train_data,
        val_data,
        val_ids,
        ", ".join(map(str, data.sources)),
        template,
        recipe,
        selection,
    )


def _layer_selection(
    teacher, recipe: Recipe, train_data: PackedData, dist: Dist, cached: Path, progress: bool
) -> LayerSelection:
    """The recipe's softmax-layer selection on the first training sequences, measured once (main process) and kept in
    `cached`, so that a rerun resumes with the same layers; nothing to measure or keep when the spec keeps no layer of
    this model (K = 0)."""
    calibration_ids = train_data.input_ids[:CALIBRATION_SEQUENCES]
    if check_selection_size(recipe, teacher.config.num_hidden_layers)[1] == 0:
        return select_softmax_layers(teacher, recipe, calibration_ids, dist.device, progress)
    key = {
        "softmax_layers": recipe.softmax_layers,
        "teacher_config": _digest(teacher.config.to_dict()),
        "calibration_ids": _digest(calibration_ids.tolist()),
        "conversion": _digest(
            [recipe.window, recipe.feature_map, recipe.hedgehog_dim, recipe.linear_only, recipe.window_factor_init]
        ),
    }
    if dist.is_main and read_checkpoint(cached, key) is None:
        selection = select_softmax_layers(teacher, recipe, calibration_ids, dist.device, progress)
        atomic_save({"key": key, "selection": dataclasses.asdict(selection)}, cached)
    dist.barrier()
    return LayerSelection(**read_checkpoint(cached, key)["selection"])


def _converted_layer_text(recipe: dict) -> str:
    """What a converted layer computes, for the model card (`recipe`: a Recipe's dict)."""
    maps = f"{recipe['feature_map']} feature maps"
    if recipe["linear_only"]:
        return f"pure linear attention, {maps}"
    sinks = recipe.get("sinks", 0)
    window = f"sliding-window softmax ({recipe['window']} keys, the current one included"
    window += f", and the first {sinks} tokens as attention sinks)" if sinks else ")"
    if recipe.get("linear_factor_init") == 0:
        text = f"{window} without a linear term"
    else:
        text = f"{window} plus linear attention over older keys, with one shared denominator, {maps}"
    if recipe.get("retrieval_keys"):
        text += f"; in generation also the {recipe['retrieval_keys']} older prompt keys its last queries attend to most"
    return text


def _teacher_text(
    teacher, tokenizer, recipe: Recipe, data: DataOptions, dist: Dist, cached: Path, progress: bool
) -> PackedData:
    """The teacher's own text as training data, generated once (main process) and kept in `cached`."""
    key = {
        "teacher_config": _digest(teacher.config.to_dict()),
        "teacher_sequences": data.teacher_sequences,
        "seq_len": recipe.seq_len,
        "seed": recipe.seed,
    }
    if dist.is_main and read_checkpoint(cached, key) is None:
        logger.info("the teacher writes %d training sequences of %d tokens", data.teacher_sequences, recipe.seq_len)
        generated = teacher_generated_text(
            teacher.to(dist.device),
            tokenizer,
            data.teacher_sequences,
            recipe.seq_len,
            seed=recipe.seed,
            progress=progress,
        )
        teacher.to("cpu")
        atomic_save({"key": key, "input_ids": generated.input_ids}, cached)
    dist.barrier()
    input_ids = read_checkpoint(cached, key).get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or list(input_ids.shape) != [data.teacher_sequences, recipe.seq_len]:
        raise ConversionError(f"{cached} does not hold the teacher's text; delete it or pass --no-resume")
    return PackedData(input_ids, input_ids.clone(), "teacher-generated text")


def plan_stages(inputs: Inputs, recipe: Recipe, student: BasedForCausalLM, dist: Dist) -> Plan:
    """Each stage's optimizer steps (given, from a token budget, or from epochs) and its checkpoint key."""
    config, num_sequences = inputs.config, len(inputs.train_data)
    # Block-wise stage 1 trains each block in one process (blocks spread over processes), so its batch is per block.
    world1 = 1 if recipe.blockwise else dist.world
    global_batch = recipe.batch_size * recipe.grad_accum * dist.world
    steps1 = resolve_steps(
        recipe.stage1_steps,
        recipe.stage1_tokens,
        recipe.epochs,
        num_sequences,
        recipe.batch_size * recipe.grad_accum * world1,
        recipe.seq_len,
    )
    steps2 = resolve_steps(
        recipe.stage2_steps, recipe.stage2_tokens, recipe.stage2_epochs, num_sequences, global_batch, recipe.seq_len
    )
    if steps1 and not stage1_parameters(student, config):
        _log(
            dist,
            "stage 1 skipped: this recipe has nothing to train in it (Taylor feature maps without a window, or no "
            "linear term)",
        )
        steps1 = 0
    # Every setting that changes a stage's result; the step count only where the schedule depends on it (cosine), so
    # that a finished constant-rate stage can be continued with more steps.
    cosine = recipe.lr_schedule == "cosine"
    key1 = {
        **recipe.settings_of_stage(1),
        "base": inputs.base_name,
        "teacher_config": _digest(inputs.teacher.config.to_dict()),
        "teacher_weights": weights_digest(inputs.teacher),
        "mixers": _digest(config.mixer_types),
        "data": data_digest(inputs.train_data),
        "world_size": world1,
        **({"stage1_steps": steps1} if cosine else {}),
    }
    key2 = {
        **key1,
        **recipe.settings_of_stage(2),
        "world_size": dist.world,
        "stage1_steps": steps1,
        **({"stage2_steps": steps2} if cosine else {}),
    }
    _log(
        dist,
        "converting %s: %d/%d layers become %s; %d training sequences of %d tokens; stage 1: %d steps, stage 2: "
        "%d steps of %d sequences",
        inputs.base_name,
        len(converted_layers(config)),
        config.num_hidden_layers,
        _converted_layer_text(recipe.to_dict()),
        num_sequences,
        recipe.seq_len,
        steps1,
        steps2,
        global_batch,
    )
    return Plan(steps1, steps2, key1, key2)


def stage1_attention_transfer(
    student: BasedForCausalLM,
    inputs: Inputs,
    recipe: Recipe,
    plan: Plan,
    dist: Dist,
    checkpoints: Path,
    progress: bool = True,
    on_step=None,
) -> tuple[StageResult | None, dict]:
    """Stage 1, joint or block-wise, into `student`; a finished stage-1 checkpoint is loaded instead of retrained.
    -> (its result, or None when `recipe.block_index` trained one block only; the validation attention MSE before
    and after it, joint training only: block-wise, the full model need not fit the device)."""
    steps, key, checkpoint = plan.stage1_steps, plan.stage1_key, checkpoints / "stage1.pt"
    if not steps:
        return StageResult("stage 1 attention transfer", 0, 0, 0.0, [], skipped=True), {}
    measure = dist.is_main and not recipe.blockwise
    autocast = autocast_for(dist.device, recipe.precision)
    metrics = {}
    finished = read_checkpoint(checkpoint, key)
    if finished is not None and finished["done"] and finished["step"] == steps:  # a rerun after stage 1
        student.load_state_dict(finished["model"], strict=False)
        history = finished["history"]
        result = StageResult(
            "stage 1 attention transfer", finished["step"], history[-1]["tokens"], history[-1]["seconds"], history
        )
    else:
        if measure:
            student.to(dist.device)
            metrics["val attention MSE x factor, before stage 1"] = attention_mse(
                student, inputs.val_ids, recipe.mse_factor, recipe.batch_size, autocast
            )
        if recipe.blockwise:
            result = run_blockwise_stage1(
                inputs.teacher,
                student,
                recipe,
                inputs.train_data,
                steps,
                dist,
                checkpoints,
                key,
                progress=progress,
                on_step=on_step,
            )
            if result is None:
                return None, metrics
        else:
            student.to(dist.device)
            result = run_stage1(student, recipe, inputs.train_data, steps, dist, checkpoint, key, progress, on_step)
    if measure:
        student.to(dist.device)
        metrics["val attention MSE x factor, after stage 1"] = attention_mse(
            student, inputs.val_ids, recipe.mse_factor, recipe.batch_size, autocast
        )
    return result, metrics


def stage2_lora(
    student: BasedForCausalLM,
    inputs: Inputs,
    recipe: Recipe,
    plan: Plan,
    dist: Dist,
    checkpoints: Path,
    progress: bool = True,
    on_step=None,
) -> StageResult:
    """Stage 2 (LoRA) on `student` after stage 1; its weights stay in OUT/checkpoints/stage2.pt."""
    if not plan.stage2_steps:
        return StageResult("stage 2 LoRA", 0, 0, 0.0, [], skipped=True)
    if not (recipe.fsdp and dist.world > 1):  # FSDP shards the model from the CPU
        student.to(dist.device)
    return run_stage2(
        student,
        recipe,
        inputs.train_data,
        plan.stage2_steps,
        dist,
        checkpoints / "stage2.pt",
        plan.stage2_key,
        inputs.teacher,
        progress,
        on_step,
    )


def save_artifacts(
    out: Path,
    inputs: Inputs,
    recipe: Recipe,
    plan: Plan,
    stages: dict[str, StageResult],
    metrics: dict,
    dist: Dist,
    dtype: str | torch.dtype | None = "auto",
    evaluation: EvalOptions | None = None,
    started: float | None = None,
    overwrite: bool = False,
) -> ConversionResult:
    """Main process: assemble the converted model from the stage checkpoints, measure it (validation perplexity,
    lm-eval), and save it with its tokenizer, loss curves, conversion.json and model card: all of it staged and moved
    into OUT whole (an existing model replaced only with `overwrite`; OUT/checkpoints kept). Other processes return
    a result without a model."""
    evaluation = evaluation or EvalOptions()
    result = ConversionResult(out, None, inputs.tokenizer, recipe, stages, metrics)
    if not dist.is_main:
        return result
    checkpoints = out / "checkpoints"
    teacher, device = inputs.teacher, dist.device
    autocast = autocast_for(device, recipe.precision)
    stage1_state = read_checkpoint(checkpoints / "stage1.pt", plan.stage1_key)["model"] if plan.stage1_steps else None
    lora_state = read_checkpoint(checkpoints / "stage2.pt", plan.stage2_key)["model"] if plan.stage2_steps else None
    model = assemble(teacher, recipe, stage1_state, lora_state, device=device)
    if inputs.val_data is not None:
        with progress_phase("validation perplexity"):
            teacher.to(device)
            metrics["val perplexity, teacher"] = perplexity(
                teacher, inputs.val_data, device, recipe.batch_size, autocast
            )
            teacher.to("cpu")
            metrics["val perplexity, converted"] = perplexity(
                model, inputs.val_data, device, recipe.batch_size, autocast
            )
    out_dtype = _output_dtype(dtype, teacher)
    with model_directory(out, overwrite, keep=("checkpoints",)) as staging:
        model.to(out_dtype).save_pretrained(staging)
        model.to(torch.float32)
        inputs.tokenizer.save_pretrained(staging)
        result.model = model
        if evaluation.tasks:
            with progress_phase(f"lm-eval on teacher and converted model ({', '.join(split_tasks(evaluation.tasks))})"):
                result.teacher_eval_results, result.eval_results = evaluate_pair(
                    teacher,
                    model,
                    inputs.tokenizer,
                    evaluation.tasks,
                    evaluation.data_dir,
                    evaluation.limit,
                    evaluation.batch_size,
                    device,
                    evaluation.teacher_results,
                )
        for key, stage in stages.items():
            if stage.history:
                write_loss_csv(stage, staging / f"loss_{key}.csv")
        plot_loss_curves(
            list(stages.values()), staging / "loss_curves.png", title=f"{inputs.base_name} -> BASED (LoLCATs)"
        )
        config, selection = inputs.config, inputs.layer_selection
        result.info = {
            "name": out.name,
            "base_model": inputs.base_name,
            "hf_based_version": __version__,
            "recipe": recipe.to_dict(),
            "layers": {
                "total": config.num_hidden_layers,
                "converted": len(converted_layers(config)),
                "softmax": [i for i, m in enumerate(config.mixer_types) if m == "full_attention"],
            },
            "softmax_layers_selected": selection.layers if selection else None,
            "layer_selection": dataclasses.asdict(selection) if selection else None,
            "data": inputs.data_name,
            "template": inputs.template,
            "train_sequences": len(inputs.train_data),
            "world_size": dist.world,
            "device": str(device),
            "dtype": str(out_dtype).removeprefix("torch."),
            "stages": {
                k: {
                    "steps": s.steps,
                    "tokens": s.tokens,
                    "seconds": round(s.seconds, 2),
                    "tokens_per_second": s.tokens_per_second,
                    "steady_tokens_per_second": s.steady_tokens_per_second,
                    "final_loss": s.final_loss(),
                }
                for k, s in stages.items()
            },
            "metrics": metrics,
            "eval": result.eval_results,
            "teacher_eval": result.teacher_eval_results,
            "eval_limit": evaluation.limit,
            "seconds": round(time.perf_counter() - started, 1) if started is not None else None,
            "settings": run_settings(
                plan, out_dtype
            ),  # what a rerun must match to replace this model without overwrite
        }
        (staging / "conversion.json").write_text(json.dumps(result.info, indent=2, default=str))
        (staging / "README.md").write_text(model_card(result.info))
    logger.info("saved the converted model to %s", out)
    return result


# --- the whole conversion -------------------------------------------------------------------------------------------


def convert(
    base: str | None = None,
    out: str | Path = "converted",
    recipe: Recipe | None = None,
    *,
    teacher=None,
    tokenizer=None,
    base_name: str | None = None,
    data: str | Path | Sequence[str | Path] | None = None,
    template: str = DataOptions.template,
    teacher_sequences: int = DataOptions.teacher_sequences,
    val_records: int = DataOptions.val_records,
    val_sequences: int = DataOptions.val_sequences,
    max_records: int | None = None,
    resume: bool = True,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = "auto",
    eval_tasks: str | Sequence[str] | None = None,
    eval_data_dir: str | Path | None = None,
    eval_limit: int | float | None = None,
    eval_batch_size: int = EvalOptions.batch_size,
    teacher_eval_results: dict | None = None,
    progress: bool = True,
    on_step: Callable[[str, int], None] | None = None,
) -> ConversionResult:
    """Convert `base` (local directory, hub id or .gguf file; or a loaded `teacher` + `tokenizer`) into a
    BASED-family checkpoint in `out`. See the module docstring for the stages and `Recipe` for the settings.

    base_name: how the model card names the teacher (default: BASE or the teacher's name_or_path).
    data: training files/directories/hub datasets, or "teacher" for text the teacher generates
        (`teacher_sequences` chunks of seq_len tokens); with the other data keywords, a `DataOptions`.
    resume: continue from OUT/checkpoints if their settings match (False: start over, deleting them and, with
        `overwrite`, a finished model in OUT). overwrite: replace a finished model in OUT; without it, only a rerun
        with identical settings may save it again. dtype: of the saved weights ("auto": the teacher's).
    eval_tasks: lm-eval tasks to score the teacher and the converted model on (hf_based.eval; `eval_data_dir` for
        local data); `teacher_eval_results` skips the teacher; with the other eval keywords, an `EvalOptions`.
    on_step(stage name, step): called after every optimizer step (tests use it to interrupt a run).
    """
    started = time.perf_counter()
    recipe = recipe or Recipe()
    sources = [data] if isinstance(data, (str, Path)) else list(data or [])
    data_options = DataOptions(sources, template, teacher_sequences, val_records, val_sequences, max_records)
    evaluation = EvalOptions(eval_tasks, eval_data_dir, eval_limit, eval_batch_size, teacher_eval_results)
    check_options(recipe, data_options, evaluation)
    dist = Dist.create()
    out = prepare_output(out, resume, overwrite, dist)
    checkpoints = out / "checkpoints"

    inputs = load_inputs(
        base,
        recipe,
        data_options,
        dist,
        checkpoints,
        teacher=teacher,
        tokenizer=tokenizer,
        base_name=base_name,
        progress=progress,
    )
    recipe = inputs.recipe
    # The full model goes to the device for joint stage 1 and for unsharded stage 2; block-wise stage 1 moves one
    # block at a time, FSDP shards it from the CPU.
    student = linearize_model(inputs.teacher, recipe, device="cpu")
    plan = plan_stages(inputs, recipe, student, dist)
    check_rerun(out, run_settings(plan, _output_dtype(dtype, inputs.teacher)), overwrite)
    check_checkpoints(plan, checkpoints)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)

    stage1, metrics = stage1_attention_transfer(student, inputs, recipe, plan, dist, checkpoints, progress, on_step)
    if stage1 is None:  # only one block was asked for (block_index)
        return ConversionResult(out, None, inputs.tokenizer, recipe, {}, metrics)
    stage2 = stage2_lora(student, inputs, recipe, plan, dist, checkpoints, progress, on_step)
    del student
    if dist.device.type == "cuda":
        torch.cuda.empty_cache()

    # No barrier after this: the other processes are done, and waiting for the main one's evaluation could outlast
    # the process group's timeout.
    stages = {"stage1": stage1, "stage2": stage2}
    # check_rerun allowed replacing a model in OUT: --overwrite, or the same settings
    return save_artifacts(out, inputs, recipe, plan, stages, metrics, dist, dtype, evaluation, started, overwrite=True)


def evaluate_pair(
    teacher, model, tokenizer, tasks, data_dir, limit, batch_size, device, teacher_results=None, metadata=None
):
    """lm-eval scores of the teacher (unless given) and the converted model: (teacher results, converted results).
    metadata: lm-eval task metadata, e.g. the retrieval tasks' lengths."""
    kwargs = dict(tokenizer=tokenizer, data_dir=data_dir, limit=limit, batch_size=batch_size, metadata=metadata)
    if teacher_results is None:
        teacher.to(device)
        teacher_results = evaluate(teacher, tasks, **kwargs)
        teacher.to("cpu")
    return teacher_results, evaluate(model, tasks, **kwargs)
