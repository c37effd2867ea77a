"""`hf-based import-lolcats BASE_LLAMA DISTILL_PT [FINETUNE_PT] OUT`: released LoLCATs checkpoints applied to their
base Llama."""

import argparse

from hf_based.conversion.recipe import LOLCATS_LORA_ALPHA, LOLCATS_WINDOW
from hf_based.utils import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base_llama", metavar="BASE_LLAMA", help="base Llama directory or hub id")
    parser.add_argument("distill", metavar="DISTILL_PT", help="attention-transfer .pt file or hub repo with model.pt")
    parser.add_argument("finetune", metavar="FINETUNE_PT", nargs="?", help="LoRA fine-tune .pt file or hub repo")
    parser.add_argument("out", metavar="OUT", help="directory for the converted checkpoint and its tokenizer")
    parser.add_argument(
        "--window",
        type=int,
        default=LOLCATS_WINDOW,
        help=f"softmax keys per query, itself included (default: {LOLCATS_WINDOW}, LoLCATs' decode window)",
    )
    parser.add_argument(
        "--lora-alpha",
        type=float,
        default=LOLCATS_LORA_ALPHA,
        help=f"LoRA alpha of the fine-tune, not stored in the .pt (default: {LOLCATS_LORA_ALPHA:g}, the released runs)",
    )
    parser.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto", help="parameter dtype (default: the base model's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")


def run(args: argparse.Namespace) -> None:
    from hf_based.importers.lolcats import import_lolcats

    model = import_lolcats(
        args.base_llama,
        args.distill,
        args.finetune,
        args.out,
        args.window,
        args.lora_alpha,
        args.dtype,
        overwrite=args.overwrite,
    )
    print(
        f"hf-based import-lolcats: {args.base_llama} + {args.distill}"
        f"{' + ' + args.finetune if args.finetune else ''} ({model.config.num_hidden_layers} hybrid layers, "
        f"window {model.config.sliding_window}; {model.num_parameters():,} parameters, {model.dtype}) -> {args.out}"
    )
