"""`hf-based init OUT --preset NAME`: a randomly initialised model and its tokenizer."""

import argparse

from hf_based.errors import UsageError
from hf_based.modeling.presets import PRESETS
from hf_based.outputs import check_output_directory
from hf_based.utils import DTYPES

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="directory for the checkpoint and its tokenizer")
    parser.add_argument("--preset", required=True, choices=list(PRESETS), help="model size and layer layout")
    parser.add_argument(
        "--tokenizer", metavar="PATH_OR_ID", help="tokenizer directory or hub id (default: the bundled GPT-2 BPE)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random initialisation (default: 0)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")


def run(args: argparse.Namespace) -> None:
    import torch

    from hf_based.importers.common import save_checkpoint
    from hf_based.modeling import BasedForCausalLM, preset_config
    from hf_based.tokenizer import load_tokenizer

    out = check_output_directory(args.out, args.overwrite)
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise UsageError(f"--seed {args.seed} is out of range; accepted: {SEED_RANGE[0]} to {SEED_RANGE[1]}")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (OSError, ValueError) as error:  # missing directory, unknown hub id, no tokenizer files
        raise UsageError(f"cannot load tokenizer {args.tokenizer!r}: {error}") from error
    # The checkpoint ships with this tokenizer, so its special tokens are the ones generate() should use.
    config = preset_config(args.preset, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if len(tokenizer) > config.vocab_size:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens but preset {args.preset!r} has vocab_size={config.vocab_size}; "
            "use a tokenizer whose vocabulary fits the preset"
        )
    torch.manual_seed(args.seed)
    model = BasedForCausalLM(config).to(getattr(torch, args.dtype))
    # generate() pads with this; config.pad_token_id stays unset, as it would freeze that embedding row (GPT-2 pad == eos).
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    save_checkpoint(model, tokenizer, out, args.overwrite)
    print(f"hf-based init: preset {args.preset!r}, {model.num_parameters():,} parameters ({args.dtype}) -> {out}")
