"""Loading the teacher (the Llama-family checkpoint to convert): a local directory, a hub id, or a GGUF file."""

from __future__ import annotations

import torch

from hf_based.checkpoints import gguf_location, load_config
from hf_based.conversion.linearize import check_supported
from hf_based.errors import ConversionError


def load_teacher_config(base: str):
    """The teacher's config, checked to be convertible, without loading any weights."""
    config = load_config(base)
    check_supported(config)
    return config


def load_teacher(base: str, dtype: torch.dtype | str | None = None):
    """-> (model in eval mode on the CPU, tokenizer). GGUF files are dequantized by transformers (`gguf_file=`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_teacher_config(base)
    gguf = gguf_location(base)
    source, kwargs = (gguf[0], {"gguf_file": gguf[1]}) if gguf else (base, {})
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot load BASE {base!r}: {str(error).splitlines()[0]}") from error
    if getattr(model.config, "quantization_config", None) is not None:  # GGUF: dequantized, an ordinary model now
        del model.config.quantization_config
        model.hf_quantizer = None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
