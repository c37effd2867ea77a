"""BASED-family models for transformers: the config (`configuration_based`), the model (`modeling_based`), its cache
(`cache`) and named presets (`presets`)."""

from hf_based.utils import lazy_exports

__all__ = [
    "BasedCache",
    "BasedConfig",
    "BasedForCausalLM",
    "BasedModel",
    "BasedPreTrainedModel",
    "MIXER_TYPES",
    "PRESETS",
    "preset_config",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "hf_based.modeling.cache": ("BasedCache",),
        "hf_based.modeling.configuration_based": ("MIXER_TYPES", "BasedConfig", "preset_config"),
        "hf_based.modeling.modeling_based": ("BasedForCausalLM", "BasedModel", "BasedPreTrainedModel"),
        "hf_based.modeling.presets": ("PRESETS",),
    },
)
