"""The `hf-based` command line (also `python -m hf_based`).

Each subcommand is a `Command` in `COMMANDS`, one module per command: a function adding its arguments to its
sub-parser and a function running it. The command modules import torch and the models in their run functions only,
so that parsing (and `--help`) does not wait for them. Every failure is reported as one line on stderr with exit
status 1; `--debug` (or HF_BASED_DEBUG=1) shows the traceback instead.
"""

import argparse
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from hf_based import __version__, register_auto_classes
from hf_based.cli import bench, convert, eval, import_based, import_lolcats, init, mqar
from hf_based.errors import HfBasedError
from hf_based.utils import free_cpu_threads


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


COMMANDS: dict[str, Command] = {
    "init": Command("create a randomly initialised model from a preset", init.add_arguments, init.run),
    "import-based": Command(
        "convert a released HazyResearch BASED checkpoint", import_based.add_arguments, import_based.run
    ),
    "import-lolcats": Command(
        "apply released LoLCATs checkpoints to their base Llama", import_lolcats.add_arguments, import_lolcats.run
    ),
    "eval": Command("score causal LMs on lm-eval tasks (local JSONL with --data-dir)", eval.add_arguments, eval.run),
    "convert": Command(
        "linearize a Llama-family checkpoint with LoLCATs (attention transfer + LoRA)",
        convert.add_convert_arguments,
        convert.run_convert,
    ),
    "demo": Command(
        "convert SmolLM2-135M-Instruct with a short recipe and compare it with the teacher",
        convert.add_demo_arguments,
        convert.run_demo,
    ),
    "mqar": Command(
        "train small models of each mixer family on MQAR; plot recall against state size",
        mqar.add_arguments,
        mqar.run,
    ),
    "bench": Command(
        "prefill and decode throughput of a BASED model against a same-size Transformer",
        bench.add_arguments,
        bench.run,
    ),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse without the usage block on a bad argument: one line on stderr, exit status 2 (a usage error)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hf-based", description="BASED-family language models for transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (or HF_BASED_DEBUG=1)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(subparsers.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The library logs; the command line shows its INFO messages as plain lines.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("hf_based").setLevel(logging.INFO)
    try:
        import torch

        register_auto_classes()
        if "OMP_NUM_THREADS" not in os.environ:  # the user's setting wins
            torch.set_num_threads(free_cpu_threads())
        COMMANDS[args.command].run(args)
    except Exception as error:
        if args.debug or os.environ.get("HF_BASED_DEBUG", "") not in ("", "0"):
            raise
        parser.exit(1, f"hf-based {args.command}: error: {one_line(error)}\n")
    return 0


def one_line(error: Exception) -> str:
    """What went wrong, in one line: our own errors as they are; OS errors with their errno name and path (ENOSPC:
    disk full, EACCES: permission); anything else as an unexpected error."""
    if isinstance(error, HfBasedError):
        return str(error)
    if isinstance(error, OSError) and error.errno is not None:
        where = f": {error.filename}" if error.filename else ""
        return f"{os.strerror(error.errno)} ({errno.errorcode.get(error.errno, error.errno)}){where}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"unexpected {type(error).__name__}: {first} (rerun with --debug for the traceback)"
