"""LoLCATs conversion of Llama-family checkpoints into BASED-family models (`hf-based convert` / `hf-based demo`).

Names resolve lazily, so `import hf_based.conversion` stays light.
"""

import importlib

_EXPORTS = {
    "ConversionError": "hf_based.errors",
    "NonFiniteLossError": "hf_based.errors",
    "Recipe": "hf_based.conversion.recipe",
    "SUPPORTED_MODEL_TYPES": "hf_based.conversion.linearize",
    "AttentionTransfer": "hf_based.conversion.linearize",
    "based_config": "hf_based.conversion.linearize",
    "linearize_model": "hf_based.conversion.linearize",
    "convert": "hf_based.conversion.pipeline",
    "ConversionResult": "hf_based.conversion.pipeline",
    "load_teacher": "hf_based.conversion.teacher",
    "load_training_data": "hf_based.conversion.data",
    "teacher_generated_text": "hf_based.conversion.data",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
