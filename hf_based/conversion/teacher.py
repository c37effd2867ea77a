"""Loading the teacher (the Llama-family checkpoint to convert): a local directory, a hub id, or a GGUF file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from hf_based.conversion.errors import ConversionError
from hf_based.conversion.linearize import check_supported


def _gguf_location(base: str) -> tuple[Path, str] | None:
    """(directory, file name) when `base` is a .gguf file or a directory holding exactly one (and no config.json)."""
    path = Path(base).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise ConversionError(f"{path} holds several GGUF files ({', '.join(f.name for f in files)}); name one")
        if files:
            return path, files[0].name
    return None


def load_teacher_config(base: str):
    """The teacher's config, checked to be convertible, without loading any weights."""
    from transformers import AutoConfig

    path = Path(base).expanduser()
    if not path.exists() and (base.startswith(("/", ".", "~")) or base.endswith(".gguf") or base.count("/") > 1):
        raise ConversionError(f"BASE {base!r} does not exist")
    gguf = _gguf_location(base)
    try:
        if gguf is not None:
            _require_gguf()
            config = AutoConfig.from_pretrained(gguf[0], gguf_file=gguf[1])
        else:
            config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(
            f"cannot load BASE {base!r}: it is not a readable checkpoint directory, GGUF file or reachable hub id "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from error
    check_supported(config)
    return config


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConversionError("reading a GGUF checkpoint needs the `gguf` package: pip install gguf")


def load_teacher(base: str, dtype: torch.dtype | str | None = None):
    """-> (model in eval mode on the CPU, tokenizer). GGUF files are dequantized by transformers (`gguf_file=`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_teacher_config(base)
    gguf = _gguf_location(base)
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
