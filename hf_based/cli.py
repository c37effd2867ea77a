"""The `hf-based` command line (also `python -m hf_based`).

Each subcommand is a `Command` in `COMMANDS`: a function adding its arguments to its sub-parser and a function
running it. Subcommands with more code live in their own modules and are only listed here.
"""

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_based import __version__
from hf_based.conversion.import_based import add_import_based_arguments, run_import_based
from hf_based.conversion.import_lolcats import add_import_lolcats_arguments, run_import_lolcats
from hf_based.conversion.errors import ConversionError
from hf_based.conversion.options import add_convert_arguments, add_demo_arguments, run_convert, run_demo
from hf_based.eval.lm_eval_tasks import add_eval_arguments, run_eval
from hf_based.eval.mqar import add_mqar_arguments, run_mqar
from hf_based.eval.throughput import add_bench_arguments, run_bench_command
from hf_based.modeling import PRESETS, BasedForCausalLM, preset_config
from hf_based.tokenizer import load_tokenizer


class CLIError(Exception):
    """Bad user input: reported as one line on stderr with a non-zero exit status, no traceback."""


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


DTYPES = ("float32", "bfloat16", "float16")


def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="directory for the checkpoint and its tokenizer")
    parser.add_argument("--preset", required=True, choices=list(PRESETS), help="model size and layer layout")
    parser.add_argument(
        "--tokenizer", metavar="PATH_OR_ID", help="tokenizer directory or hub id (default: the bundled GPT-2 BPE)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random initialisation (default: 0)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype (default: float32)")


def run_init(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.is_file():
        raise CLIError(f"{out} is a file; OUT must be a directory")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (OSError, ValueError) as error:  # missing directory, unknown hub id, no tokenizer files
        raise CLIError(f"cannot load tokenizer {args.tokenizer!r}: {error}") from error
    # The checkpoint ships with this tokenizer, so its special tokens are the ones generate() should use.
    config = preset_config(args.preset, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if len(tokenizer) > config.vocab_size:
        raise CLIError(
            f"the tokenizer has {len(tokenizer)} tokens but preset {args.preset!r} has vocab_size={config.vocab_size}; "
            "use a tokenizer whose vocabulary fits the preset"
        )
    torch.manual_seed(args.seed)
    model = BasedForCausalLM(config).to(getattr(torch, args.dtype))
    # generate() pads with this; config.pad_token_id stays unset, as it would freeze that embedding row (GPT-2 pad == eos).
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"hf-based init: preset {args.preset!r}, {model.num_parameters():,} parameters ({args.dtype}) -> {out}")


COMMANDS: dict[str, Command] = {
    "init": Command("create a randomly initialised model from a preset", add_init_arguments, run_init),
    "import-based": Command(
        "convert a released HazyResearch BASED checkpoint", add_import_based_arguments, run_import_based
    ),
    "import-lolcats": Command(
        "apply released LoLCATs checkpoints to their base Llama", add_import_lolcats_arguments, run_import_lolcats
    ),
    "eval": Command("score causal LMs on lm-eval tasks (local JSONL with --data-dir)", add_eval_arguments, run_eval),
    "convert": Command(
        "linearize a Llama-family checkpoint with LoLCATs (attention transfer + LoRA)", add_convert_arguments,
        run_convert,
    ),
    "demo": Command(
        "convert SmolLM2-135M-Instruct with a short recipe and compare it with the teacher", add_demo_arguments,
        run_demo,
    ),
    "mqar": Command(
        "train small models of each mixer family on MQAR; plot recall against state size", add_mqar_arguments, run_mqar
    ),
    "bench": Command(
        "prefill and decode throughput of a BASED model against a same-size Transformer", add_bench_arguments,
        run_bench_command,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-based", description="BASED-family language models for transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(subparsers.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command].run(args)
    except (CLIError, ConversionError) as error:
        parser.exit(1, f"hf-based {args.command}: error: {error}\n")
    return 0
