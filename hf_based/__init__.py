"""hf-based: BASED-family sub-quadratic language models in the Hugging Face ecosystem."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hf_based.modeling import (
    PRESETS,
    BasedCache,
    BasedConfig,
    BasedForCausalLM,
    BasedModel,
    preset_config,
)

__version__ = "0.1.0"

# `import hf_based` is all AutoConfig / AutoModel* need to load our checkpoints (no trust_remote_code).
AutoConfig.register(BasedConfig.model_type, BasedConfig, exist_ok=True)
AutoModel.register(BasedConfig, BasedModel, exist_ok=True)
AutoModelForCausalLM.register(BasedConfig, BasedForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "BasedCache", "BasedConfig", "BasedForCausalLM", "BasedModel", "preset_config"]
