"""`hf-based import-based SRC OUT`: a released HazyResearch BASED checkpoint as an hf-based one."""

import argparse

from hf_based.utils import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="original checkpoint directory or hub id (hazyresearch/based-360m)")
    parser.add_argument("out", metavar="OUT", help="directory for the converted checkpoint and its tokenizer")
    parser.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto", help="parameter dtype (default: the checkpoint's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")


def run(args: argparse.Namespace) -> None:
    from hf_based.importers.based import import_based

    model = import_based(args.src, args.out, args.dtype, overwrite=args.overwrite)
    counts = {mixer: model.config.mixer_types.count(mixer) for mixer in dict.fromkeys(model.config.mixer_types)}
    layers = ", ".join(f"{n} {mixer}" for mixer, n in counts.items())
    print(
        f"hf-based import-based: {args.src} ({layers}; {model.num_parameters():,} parameters, {model.dtype})"
        f" -> {args.out}"
    )
