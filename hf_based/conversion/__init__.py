"""LoLCATs conversion of Llama-family checkpoints into BASED-family models (`hf-based convert` / `hf-based demo`)."""

from hf_based.conversion.data import load_training_data, teacher_generated_text
from hf_based.conversion.layer_selection import LayerSelection, select_softmax_layers
from hf_based.conversion.linearize import SUPPORTED_MODEL_TYPES, AttentionTransfer, based_config, linearize_model
from hf_based.conversion.pipeline import ConversionResult, convert
from hf_based.conversion.recipe import Recipe
from hf_based.conversion.teacher import load_teacher
from hf_based.errors import ConversionError, NonFiniteLossError

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AttentionTransfer",
    "ConversionError",
    "ConversionResult",
    "LayerSelection",
    "NonFiniteLossError",
    "Recipe",
    "based_config",
    "convert",
    "linearize_model",
    "load_teacher",
    "load_training_data",
    "select_softmax_layers",
    "teacher_generated_text",
]
