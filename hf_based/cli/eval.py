"""`hf-based eval MODEL --tasks ...`: lm-eval scores of any causal LM, optionally beside a base model's."""

import argparse
import json
import math
from pathlib import Path

from hf_based.cli.common import check_writable
from hf_based.cli.common import device as command_device
from hf_based.errors import UnknownTaskError, UsageError
from hf_based.eval.lm_eval_tasks import (
    LOCAL_TASKS,
    RETRIEVAL_NAMES,
    evaluate,
    format_comparison,
    format_results,
    split_tasks,
)
from hf_based.eval.plots import plot_retrieval
from hf_based.outputs import atomic_write
from hf_based.utils import DTYPES


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value >= 1 and value.is_integer():
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text!r} is neither a document count (1, 2, ...) nor a fraction in (0, 1)")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0, 1, 2, ...)")
    return int(text)


def _metadata(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or hub id of any causal LM")
    parser.add_argument(
        "--tasks",
        required=True,
        metavar="TASKS",
        help=f"comma-separated lm-eval task names; with --data-dir: {', '.join(LOCAL_TASKS)}; always (generated, "
        f"scored per prompt length): {', '.join(RETRIEVAL_NAMES)}",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="read the standard tasks from local JSONL in the hub schema in DIR, not from the hub",
    )
    parser.add_argument(
        "--limit", type=_limit, metavar="N", help="documents per task (or a fraction < 1); default: all"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=1, metavar="N", help="default: 1")
    parser.add_argument("--num-fewshot", type=_count, metavar="N", help="default: each task's own")
    parser.add_argument(
        "--metadata",
        type=_metadata,
        metavar="JSON",
        help='task metadata, e.g. the retrieval tasks\' {"max_seq_lengths": [256, 512], "num_samples": 2, '
        '"depths": [0, 50, 100], "seed": 0}',
    )
    parser.add_argument("--output", metavar="JSON", help="also write the results to this JSON file")
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="also score the retrieval tasks by needle depth (metrics LENGTH@DEPTH) and plot them to this file: "
        "accuracy by prompt length (with --compare, both models) and each model's length x depth heat map",
    )
    parser.add_argument(
        "--compare", metavar="BASE", help="also evaluate BASE (e.g. the teacher) and print both with deltas"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="load weights in this dtype (default: the checkpoint's)",
    )


def run(args: argparse.Namespace) -> None:
    tasks = split_tasks(args.tasks)
    if not tasks:
        raise UsageError("--tasks lists no task")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir} is not a directory")
    if args.output is not None and Path(args.output).is_dir():
        raise UsageError(f"--output {args.output} is a directory; give a file name")
    for path in (args.output, args.plot):
        if path is not None:
            check_writable(Path(path))
    if args.plot is not None and not set(tasks) & set(RETRIEVAL_NAMES):
        raise UsageError(
            f"--plot draws the retrieval tasks, and --tasks has none; accepted: {', '.join(RETRIEVAL_NAMES)}"
        )
    if args.device is not None:
        command_device(args.device)  # an unknown or unavailable device fails here, before a model loads
    options = dict(
        data_dir=args.data_dir,
        limit=args.limit,
        batch_size=args.batch_size,
        num_fewshot=args.num_fewshot,
        device=args.device,
        dtype=args.dtype,
        metadata=args.metadata,
        by_depth=args.plot is not None,
    )
    evaluated = {}
    for name in [args.model] + ([args.compare] if args.compare else []):
        try:
            evaluated[name] = evaluate(name, tasks, **options)
        except (ImportError, UsageError, UnknownTaskError, FileNotFoundError) as error:  # no lm-eval, bad input
            raise UsageError(str(error)) from error
        except (ValueError, OSError) as error:  # a model or tokenizer that does not load
            raise UsageError(f"cannot evaluate {name}: {error}") from error
    results = evaluated[args.model]
    if args.compare:
        base_results = evaluated[args.compare]
        print(f"model: {args.model}\nbase:  {args.compare}")
        print(format_comparison(results, base_results))
    else:
        print(format_results(results))
    if args.plot is not None:
        if plot_retrieval(evaluated, Path(args.plot)):
            print(f"plot -> {args.plot}")
        else:
            print("matplotlib is not installed: no plot (pip install matplotlib)")
    if args.output is not None:
        report = {
            "model": args.model,
            "results": results,
            "base": args.compare,
            "base_results": evaluated.get(args.compare),
            "tasks": tasks,
            **{key: options[key] for key in ("data_dir", "limit", "batch_size", "num_fewshot", "metadata")},
        }
        atomic_write(Path(args.output), lambda temporary: temporary.write_text(json.dumps(report, indent=2) + "\n"))
        print(f"results -> {args.output}")
