from hf_based.modeling.cache import BasedCache
from hf_based.modeling.configuration_based import MIXER_TYPES, PRESETS, BasedConfig, preset_config
from hf_based.modeling.modeling_based import BasedForCausalLM, BasedModel, BasedPreTrainedModel

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
