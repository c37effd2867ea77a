"""LoLCATs conversion of Llama-family checkpoints into BASED-family models (`hf-based convert` / `hf-based demo`)."""

from hf_based.utils import lazy_exports

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
__getattr__ = lazy_exports(
    __name__,
    {
        "hf_based.conversion.data": ("load_training_data", "teacher_generated_text"),
        "hf_based.conversion.layer_selection": ("LayerSelection", "select_softmax_layers"),
        "hf_based.conversion.linearize": (
            "SUPPORTED_MODEL_TYPES",
            "AttentionTransfer",
            "based_config",
            "linearize_model",
        ),
        "hf_based.conversion.pipeline": ("ConversionResult", "convert"),
        "hf_based.conversion.recipe": ("Recipe",),
        "hf_based.conversion.teacher": ("load_teacher",),
        "hf_based.errors": ("ConversionError", "NonFiniteLossError"),
    },
)
