"""`convert()`: the whole LoLCATs conversion of a Llama-family checkpoint, from teacher to saved BASED checkpoint.

1. Linearize: the teacher's weights in a BasedForCausalLM whose attention layers are `hybrid_attention` (or pure
   `linear_attention`), except the layers kept as softmax `full_attention`.
2. Stage 1, attention transfer: everything frozen but the feature maps and gamma; loss = per-layer MSE between the
   converted and the teacher's softmax attention output before o_proj, on the teacher's hidden states
   (`linearize.AttentionTransfer`), averaged over layers x 1000. Joint, or block-wise (`blockwise.py`).
3. Stage 2: LoRA (peft) on q/k/v/o of the converted layers with the next-token loss (or distillation to the
   teacher's logits); single process, DDP, or FSDP2 when launched with `accelerate launch`.
4. Assemble: stage-1 parameters + merged LoRA (`merge_and_unload`) into a plain BasedForCausalLM; save it with
   `save_pretrained` (safetensors, remote code), the tokenizer, the generation config, a model card, the loss
   curves (CSV + PNG) and `conversion.json`.

Every stage checkpoints to OUT/checkpoints and a rerun of the same command resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_based.conversion.data import (
    IGNORE_INDEX,
    PackedData,
    check_sources,
    global_order,
    load_training_data,
    teacher_generated_text,
)
from hf_based.errors import ConversionError
from hf_based.conversion.linearize import (
    AttentionTransfer,
    Recipe,
    based_config,
    check_teacher_weights,
    converted_layers,
    linearize_model,
    lora_config,
    stage1_optimizer,
    stage1_parameters,
)
from hf_based.conversion.training import Dist, StageResult, plot_loss_curves, read_checkpoint, train, write_loss_csv
from hf_based.modeling import BasedForCausalLM

TEACHER_DATA = "teacher"  # data source: let the teacher generate its own training text


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


def resolve_steps(steps: int | None, tokens: int | None, epochs: float, num_sequences: int, global_batch: int,
                  seq_len: int) -> int:
    """Optimizer steps of a stage: given, from a token budget, or `epochs` passes over the training sequences."""
    if steps is not None:
        return steps
    if tokens is not None:
        return math.ceil(tokens / (global_batch * seq_len))
    return max(1, math.ceil(epochs * num_sequences / global_batch))


def batch_indices(order: torch.Tensor, step: int, micro: int, recipe: Recipe, dist: Dist) -> torch.Tensor:
    """The sequences of micro-batch `micro` of optimizer step `step` on this process."""
    start = ((step * recipe.grad_accum + micro) * dist.world + dist.rank) * recipe.batch_size
    return order[start : start + recipe.batch_size]


def uses_bf16(device: torch.device, recipe: Recipe) -> bool:
    """bf16 compute on CUDA (unless precision='fp32'), fp32 elsewhere; parameters stay fp32 either way."""
    return recipe.precision == "bf16" or (recipe.precision is None and device.type == "cuda")


def autocast_for(device: torch.device, recipe: Recipe) -> Callable[[], contextlib.AbstractContextManager]:
    if uses_bf16(device, recipe):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _digest(value) -> str:
    if isinstance(value, dict):  # a config: its architecture, not where it was loaded from
        value = {k: v for k, v in value.items() if not k.startswith("_") and k not in ("transformers_version", "dtype")}
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- stage 1 --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def attention_mse(model: BasedForCausalLM, input_ids: torch.Tensor, factor: float = 1.0, batch_size: int = 1,
                  autocast=contextlib.nullcontext) -> float:
    """Mean over sequences of the stage-1 loss (per-layer MSE to the teacher's attention, averaged over layers)."""
    layers = converted_layers(model.config)
    if not layers:
        return 0.0
    device = next(model.parameters()).device
    modules = {i: model.model.layers[i].self_attn for i in layers}
    losses = []
    for chunk in input_ids.split(batch_size):
        with AttentionTransfer(modules) as transfer, autocast():
            model.model(input_ids=chunk.to(device), use_cache=False)
        losses.append(float(transfer.loss(len(layers), factor)))
    return sum(losses) / len(losses)


def run_stage1(student, recipe: Recipe, train_data: PackedData, steps: int, dist: Dist, checkpoint: Path, key: dict,
               progress: bool = True, on_step=None) -> StageResult:
    """Joint attention transfer over all converted layers, on `train_data` token chunks."""
    config = student.config
    torch.manual_seed(recipe.seed)
    groups, optimizer = stage1_optimizer(student, config, recipe)
    params = [p for group in groups.values() for p in group]
    global_batch = recipe.batch_size * recipe.grad_accum * dist.world
    order = global_order(len(train_data), steps * global_batch, recipe.seed)
    modules = {i: student.model.layers[i].self_attn for i in groups}
    num_layers = len(converted_layers(config))
    autocast = autocast_for(dist.device, recipe)

    def loss_fn(step, micro):
        ids = train_data.input_ids[batch_indices(order, step, micro, recipe, dist)].to(dist.device)
        with AttentionTransfer(modules) as transfer, autocast():
            student.model(input_ids=ids, use_cache=False)
        return transfer.loss(num_layers, recipe.mse_factor), ids.numel() * dist.world

    return train(
        name="stage 1 attention transfer", model=student, optimizer=optimizer, loss_fn=loss_fn, steps=steps,
        grad_accum=recipe.grad_accum, lr=recipe.stage1_lr, warmup_steps=recipe.warmup_steps,
        lr_schedule=recipe.lr_schedule, clip_groups=list(groups.values()),
        max_grad_norm=recipe.max_grad_norm, sync_grads=lambda: dist.all_reduce_grads(params), checkpoint=checkpoint,
        checkpoint_every=recipe.checkpoint_every, key=key, dist=dist, progress=progress, on_step=on_step,
    )


# --- stage 2 --------------------------------------------------------------------------------------------------------


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels[:, 1:]
    if not (targets != IGNORE_INDEX).any():  # a chunk of prompt tokens only: nothing to learn, no NaN
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token at `temperature`, x T^2, averaged over tokens."""
    t = temperature
    student_logp = F.log_softmax(logits.float() / t, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(student_logp.flatten(0, 1), teacher_logp.flatten(0, 1), log_target=True, reduction="batchmean")
    return kl * t * t


def _shard_fsdp(peft_model, student, use_bf16: bool) -> None:
    """FSDP2 (torch fully_shard): each decoder layer is a unit, the rest the root unit; bf16 compute on CUDA."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16 else (
        MixedPrecisionPolicy()
    )
    for layer in student.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(peft_model, mp_policy=policy)


def run_stage2(student, recipe: Recipe, train_data: PackedData, steps: int, dist: Dist, checkpoint: Path, key: dict,
               teacher=None, progress: bool = True, on_step=None) -> StageResult:
    """LoRA fine-tuning of the converted layers' q/k/v/o; feature maps and gamma frozen (LoLCATs stage 2)."""
    from peft import get_peft_model

    student.requires_grad_(False)
    torch.manual_seed(recipe.seed)  # LoRA's A init and anything random in stage 2: the same in every run
    peft_model = get_peft_model(student, lora_config(recipe, student.config))
    if recipe.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.enable_input_require_grads()
    autocast = autocast_for(dist.device, recipe)
    model = peft_model
    if dist.world > 1 and recipe.fsdp:
        _shard_fsdp(peft_model, student, uses_bf16(dist.device, recipe))
        autocast = contextlib.nullcontext  # FSDP's mixed-precision policy casts instead
        mode = "FSDP2"
    elif dist.world > 1:
        model = dist.accelerator.prepare(peft_model)
        mode = "DDP"
    if dist.world > 1 and dist.is_main:
        print(f"stage 2: {mode} over {dist.world} processes", flush=True)
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
        name="stage 2 LoRA", model=model, optimizer=optimizer, loss_fn=loss_fn, steps=steps,
        grad_accum=recipe.grad_accum, lr=recipe.stage2_lr, warmup_steps=recipe.warmup_steps,
        lr_schedule=recipe.lr_schedule, max_grad_norm=recipe.max_grad_norm, checkpoint=checkpoint,
        checkpoint_every=recipe.checkpoint_every, key=key, dist=dist, progress=progress, on_step=on_step,
    )
    if recipe.stage2_loss == "distill":
        teacher.to("cpu")
    return result


# --- assembling and saving ------------------------------------------------------------------------------------------


def assemble(teacher, recipe: Recipe, stage1_state: dict | None, lora_state: dict | None,
             device="cpu") -> BasedForCausalLM:
    """A plain BasedForCausalLM from the teacher's weights, the trained feature maps/gamma and the merged LoRA."""
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
def perplexity(model, data: PackedData, device, batch_size: int = 1, autocast=contextlib.nullcontext,
               max_sequences: int | None = None) -> float:
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
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = getattr(teacher.config, "dtype", None) or "float32"
        if isinstance(dtype, torch.dtype):
            return dtype if dtype.is_floating_point else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConversionError(f"dtype={dtype!r} is not supported; accepted: auto, float32, bfloat16, float16")
    return getattr(torch, dtype)


def _fmt(value, digits=4):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


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
        f"{layers['converted']} of {layers['total']} attention layers are "
        + ("pure linear attention" if recipe["linear_only"] else
           f"sliding-window softmax ({recipe['window']} keys, the current one included) plus linear attention over "
           "older keys, with one shared denominator")
        + f", {recipe['feature_map']} feature maps"
        + (f"; layers {layers['softmax']} keep softmax attention." if layers["softmax"] else "."),
        "",
        "Load it with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` "
        "(needs `pip install hf-based`), or import `hf_based` first.",
        "",
        "## Recipe",
        "",
        "| stage | what trains | steps | tokens | lr | final loss | time | tokens/s (2nd half) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, what in (("stage1", "feature maps + window weight (attention MSE x "
                                 f"{_fmt(recipe['mse_factor'])})"),
                      ("stage2", f"LoRA r={recipe['lora_r']} alpha={_fmt(recipe['lora_alpha'])} on "
                                 f"{'/'.join(recipe['lora_targets'])} ({recipe['stage2_loss'].replace('_', '-')})")):
        s = stages.get(key)
        if not s or s["steps"] == 0:
            lines.append(f"| {key[-1]} | {what} | skipped | 0 | - | - | - | - |")
            continue
        lines.append(
            f"| {key[-1]} | {what} | {s['steps']} | {s['tokens']:,} | {_fmt(recipe[key + '_lr'])} | "
            f"{_fmt(s['final_loss'])} | {s['seconds']:.0f} s | {_fmt(s['tokens_per_second'], 3)} "
            f"({_fmt(s.get('steady_tokens_per_second'), 3)}) |"
        )
    lines += [
        "",
        f"Training data: {info['data']} (template: {info['template']}), "
        f"packed into {recipe['seq_len']}-token sequences; "
        f"batch {recipe['batch_size']} x {recipe['grad_accum']} accumulation x {info['world_size']} process(es); "
        f"AdamW, weight decay {recipe['weight_decay']}, gradient clip {recipe['max_grad_norm']}"
        + (", stage 1 block-wise, " + f"{recipe['blockwise']} layers a block" if recipe["blockwise"] else "") + ".",
        "",
    ]
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["## Validation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
        lines.append("")
    evals = info.get("eval")
    if evals:
        base = info.get("teacher_eval") or {}
        lines += ["## Evaluation (lm-eval)", "", f"Limit: {info.get('eval_limit') or 'all'} documents per task.", "",
                  "| task | metric | teacher | converted |", "|---|---|---|---|"]
        for task, values in evals.items():
            for metric, value in values.items():
                lines.append(f"| {task} | {metric} | {_fmt(base.get(task, {}).get(metric))} | {_fmt(value)} |")
        lines.append("")
    lines += ["## Recipe (all settings)", "", "```json", json.dumps(recipe, indent=2), "```", ""]
    return "\n".join(lines)


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
    template: str = "alpaca",
    teacher_sequences: int = 256,
    val_records: int = 200,
    val_sequences: int = 8,
    max_records: int | None = None,
    resume: bool = True,
    dtype: str | torch.dtype | None = "auto",
    eval_tasks: str | Sequence[str] | None = None,
    eval_data_dir: str | Path | None = None,
    eval_limit: int | float | None = None,
    eval_batch_size: int = 8,
    teacher_eval_results: dict | None = None,
    progress: bool = True,
    on_step: Callable[[str, int], None] | None = None,
) -> ConversionResult:
    """Convert `base` (local directory, hub id or .gguf file; or a loaded `teacher` + `tokenizer`) into a
    BASED-family checkpoint in `out`. See the module docstring for the stages and `Recipe` for the settings.

    base_name: how the model card names the teacher (default: BASE or the teacher's name_or_path).
    data: training files/directories/hub datasets, or "teacher" for text the teacher generates
        (`teacher_sequences` chunks of seq_len tokens). resume: continue from OUT/checkpoints (False: start over).
    dtype: of the saved weights ("auto": the teacher's). eval_tasks: lm-eval tasks to score the teacher and the
        converted model on (hf_based.eval; `eval_data_dir` for local data); `teacher_eval_results` skips the teacher.
    on_step(stage name, step): called after every optimizer step (tests use it to interrupt a run).
    """
    from hf_based import __version__

    t_start = time.perf_counter()
    recipe = recipe or Recipe()
    recipe.validate()
    out = Path(out)
    dist = Dist.create()
    log = (lambda *a: print(*a, flush=True)) if dist.is_main else (lambda *a: None)
    checkpoints = out / "checkpoints"
    if out.is_file():
        raise ConversionError(f"{out} is a file; OUT must be a directory")
    if not resume and dist.is_main and checkpoints.exists():
        shutil.rmtree(checkpoints)
    dist.barrier()

    sources = [data] if isinstance(data, (str, Path)) else list(data or [])
    if not sources:
        raise ConversionError(f"no training data: give data files/directories/hub datasets, or {TEACHER_DATA!r}")
    check_sources([s for s in sources if str(s) != TEACHER_DATA])

    # Teacher and target config.
    if teacher is None:
        if base is None:
            raise ConversionError("give BASE (a checkpoint directory, hub id or .gguf file) or a loaded teacher")
        from hf_based.conversion.teacher import load_teacher

        log(f"loading teacher {base}")
        teacher, tokenizer = load_teacher(str(base))
    elif tokenizer is None:
        raise ConversionError("a loaded teacher needs its tokenizer")
    if base_name is None:
        base_name = str(base) if base is not None else getattr(teacher.config, "name_or_path", "") or "teacher"
    teacher.eval().requires_grad_(False)
    config = based_config(teacher.config, recipe)
    check_teacher_weights(teacher, config)
    window = getattr(teacher.config, "sliding_window", None)
    if window and recipe.seq_len > window and getattr(teacher.config, "model_type", "") == "mistral":
        log(f"warning: the teacher attends within {window} tokens; training on {recipe.seq_len} differs from it")

    # Training data.
    val_data = None
    if [str(s) for s in sources] == [TEACHER_DATA]:
        cached = checkpoints / "teacher_text.pt"
        if dist.is_main and not (resume and cached.is_file()):
            from hf_based.conversion.training import atomic_save

            log(f"the teacher writes {teacher_sequences} training sequences of {recipe.seq_len} tokens")
            generated = teacher_generated_text(
                teacher.to(dist.device), tokenizer, teacher_sequences, recipe.seq_len, seed=recipe.seed,
                progress=progress,
            )
            teacher.to("cpu")
            atomic_save({"input_ids": generated.input_ids, "seq_len": recipe.seq_len}, cached)
        dist.barrier()
        saved = torch.load(cached, weights_only=True)
        if saved["seq_len"] != recipe.seq_len:
            raise ConversionError(f"{cached} holds sequences of another --seq-len; pass --no-resume")
        train_data = PackedData(saved["input_ids"], saved["input_ids"].clone(), "teacher-generated text")
        template_used = "none (teacher-generated)"
    else:
        if any(str(s) == TEACHER_DATA for s in sources):
            raise ConversionError(f"{TEACHER_DATA!r} cannot be combined with other data sources")
        train_data, val_data = load_training_data(
            sources, tokenizer, recipe.seq_len, template, val_records, max_records
        )
        template_used = template
    if val_data is not None:
        val_data = PackedData(val_data.input_ids[:val_sequences], val_data.labels[:val_sequences], val_data.source)

    # Budgets.
    # Block-wise stage 1 trains each block in one process (blocks spread over processes), so its batch is per block.
    world1 = 1 if recipe.blockwise else dist.world
    global_batch = recipe.batch_size * recipe.grad_accum * dist.world
    steps1 = resolve_steps(recipe.stage1_steps, recipe.stage1_tokens, recipe.epochs, len(train_data),
                           recipe.batch_size * recipe.grad_accum * world1, recipe.seq_len)
    steps2 = resolve_steps(recipe.stage2_steps, recipe.stage2_tokens, recipe.epochs, len(train_data), global_batch,
                           recipe.seq_len)
    # The full model goes to the device for joint stage 1 and for unsharded stage 2; block-wise stage 1 moves one
    # block at a time, FSDP shards it from the CPU.
    student = linearize_model(teacher, recipe, device="cpu")
    if steps1 and not stage1_parameters(student, config):
        log("stage 1 skipped: this recipe has nothing to train in it (Taylor feature maps without a window)")
        steps1 = 0
    data_name = ", ".join(map(str, sources))
    key1 = {
        "base": base_name, "teacher_config": _digest(teacher.config.to_dict()), "mixers": _digest(config.mixer_types),
        "window": recipe.window, "feature_map": recipe.feature_map, "hedgehog_dim": recipe.hedgehog_dim,
        "seq_len": recipe.seq_len, "batch_size": recipe.batch_size, "grad_accum": recipe.grad_accum,
        "world_size": world1, "data": data_name, "template": template_used, "seed": recipe.seed,
        "train_sequences": len(train_data), "mse_factor": recipe.mse_factor, "blockwise": recipe.blockwise,
    }
    key2 = {**key1, "world_size": dist.world, "stage1_steps": steps1, "stage1_lr": recipe.stage1_lr, "lora": _digest(
        [recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout, list(recipe.lora_targets)]),
        "stage2_loss": recipe.stage2_loss, "fsdp": recipe.fsdp}
    log(f"converting {base_name}: {len(converted_layers(config))}/{config.num_hidden_layers} layers "
        f"{'linear' if recipe.linear_only else 'hybrid'} ({recipe.feature_map}), {len(train_data)} training sequences "
        f"of {recipe.seq_len} tokens; stage 1: {steps1} steps, stage 2: {steps2} steps of {global_batch} sequences")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    autocast = autocast_for(dist.device, recipe)
    metrics: dict = {}

    # Stage 1.
    stage1_file = checkpoints / "stage1.pt"
    val_ids = val_data.input_ids if val_data is not None else train_data.input_ids[:val_sequences]
    finished = read_checkpoint(stage1_file, key1) if steps1 else None
    if finished is not None and finished["done"] and finished["step"] >= steps1:  # a rerun after stage 1
        student.load_state_dict(finished["model"], strict=False)
        history = finished["history"]
        stage1 = StageResult("stage 1 attention transfer", finished["step"], history[-1]["tokens"],
                             history[-1]["seconds"], history)
    elif steps1:
        if dist.is_main and not recipe.blockwise:  # (block-wise: the full model need not fit the device)
            student.to(dist.device)
            metrics["val attention MSE x factor, before stage 1"] = attention_mse(
                student, val_ids, recipe.mse_factor, recipe.batch_size, autocast)
        if recipe.blockwise:
            from hf_based.conversion.blockwise import run_blockwise_stage1

            stage1 = run_blockwise_stage1(teacher, student, recipe, train_data, steps1, dist, checkpoints, key1,
                                          progress=progress, on_step=on_step)
            if stage1 is None:  # only one block was asked for (block_index)
                return ConversionResult(out, None, tokenizer, recipe, {}, metrics)
        else:
            student.to(dist.device)
            stage1 = run_stage1(student, recipe, train_data, steps1, dist, stage1_file, key1, progress, on_step)
    else:
        stage1 = StageResult("stage 1 attention transfer", 0, 0, 0.0, [], skipped=True)
    if steps1 and dist.is_main and not recipe.blockwise:
        student.to(dist.device)
        metrics["val attention MSE x factor, after stage 1"] = attention_mse(
            student, val_ids, recipe.mse_factor, recipe.batch_size, autocast)
    stage1_state = read_checkpoint(stage1_file, key1)["model"] if steps1 else None

    # Stage 2.
    stage2_file = checkpoints / "stage2.pt"
    if steps2:
        if not (recipe.fsdp and dist.world > 1):
            student.to(dist.device)
        stage2 = run_stage2(student, recipe, train_data, steps2, dist, stage2_file, key2, teacher, progress, on_step)
    else:
        stage2 = StageResult("stage 2 LoRA", 0, 0, 0.0, [], skipped=True)
    del student
    if dist.device.type == "cuda":
        torch.cuda.empty_cache()

    # Assemble, measure, save (main process).
    result = ConversionResult(out, None, tokenizer, recipe, {"stage1": stage1, "stage2": stage2}, metrics)
    if dist.is_main:
        lora_state = read_checkpoint(stage2_file, key2)["model"] if steps2 else None
        model = assemble(teacher, recipe, stage1_state, lora_state, device=dist.device)
        if val_data is not None:
            teacher.to(dist.device)
            metrics["val perplexity, teacher"] = perplexity(teacher, val_data, dist.device, recipe.batch_size, autocast)
            teacher.to("cpu")
            metrics["val perplexity, converted"] = perplexity(model, val_data, dist.device, recipe.batch_size, autocast)
        out_dtype = _output_dtype(dtype, teacher)
        model.to(out_dtype).save_pretrained(out)
        model.to(torch.float32)
        tokenizer.save_pretrained(out)
        result.model = model
        if eval_tasks:
            result.teacher_eval_results, result.eval_results = evaluate_pair(
                teacher, model, tokenizer, eval_tasks, eval_data_dir, eval_limit, eval_batch_size, dist.device,
                teacher_eval_results,
            )
        for key, stage in (("stage1", stage1), ("stage2", stage2)):
            if stage.history:
                write_loss_csv(stage, out / f"loss_{key}.csv")
        plot_loss_curves([stage1, stage2], out / "loss_curves.png", title=f"{base_name} -> BASED (LoLCATs)")
        info = {
            "name": out.name, "base_model": base_name, "hf_based_version": __version__, "recipe": recipe.to_dict(),
            "layers": {"total": config.num_hidden_layers, "converted": len(converted_layers(config)),
                       "softmax": [i for i, m in enumerate(config.mixer_types) if m == "full_attention"]},
            "data": data_name, "template": template_used, "train_sequences": len(train_data),
            "world_size": dist.world, "device": str(dist.device), "dtype": str(out_dtype).removeprefix("torch."),
            "stages": {k: {"steps": s.steps, "tokens": s.tokens, "seconds": round(s.seconds, 2),
                           "tokens_per_second": s.tokens_per_second,
                           "steady_tokens_per_second": s.steady_tokens_per_second, "final_loss": s.final_loss()}
                       for k, s in result.stages.items()},
            "metrics": metrics, "eval": result.eval_results, "teacher_eval": result.teacher_eval_results,
            "eval_limit": eval_limit, "seconds": round(time.perf_counter() - t_start, 1),
        }
        (out / "conversion.json").write_text(json.dumps(info, indent=2, default=str))
        (out / "README.md").write_text(model_card(info))
        result.info = info
        log(f"saved the converted model to {out}")
    # No barrier here: the other processes are done, and waiting for the main one's evaluation could outlast the
    # process group's timeout.
    return result


def evaluate_pair(teacher, model, tokenizer, tasks, data_dir, limit, batch_size, device, teacher_results=None):
    """lm-eval scores of the teacher (unless given) and the converted model: (teacher results, converted results)."""
    from hf_based.eval.lm_eval_tasks import evaluate

    kwargs = dict(tokenizer=tokenizer, data_dir=data_dir, limit=limit, batch_size=batch_size)
    if teacher_results is None:
        teacher.to(device)
        teacher_results = evaluate(teacher, tasks, **kwargs)
        teacher.to("cpu")
    return teacher_results, evaluate(model, tasks, **kwargs)
