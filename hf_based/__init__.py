"""hf-based: BASED-family sub-quadratic language models in the Hugging Face ecosystem."""

import sys

from hf_based.utils import lazy_exports

__version__ = "0.1.0"

__all__ = ["PRESETS", "BasedCache", "BasedConfig", "BasedForCausalLM", "BasedModel", "preset_config"]
__getattr__ = lazy_exports(__name__, {"hf_based.modeling": tuple(__all__)})


def register_auto_classes() -> None:
    """Registers the "based" model type with AutoConfig / AutoModel / AutoModelForCausalLM, so that they load our
    checkpoints without trust_remote_code."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from hf_based.modeling import BasedConfig, BasedForCausalLM, BasedModel

    AutoConfig.register(BasedConfig.model_type, BasedConfig, exist_ok=True)
    AutoModel.register(BasedConfig, BasedModel, exist_ok=True)
    AutoModelForCausalLM.register(BasedConfig, BasedForCausalLM, exist_ok=True)


# `import hf_based` is all the Auto classes need. The `hf-based` command (hf_based_launcher) registers once its
# arguments are parsed instead: its --help then starts without torch.
if "hf_based_launcher" not in sys.modules:
    register_auto_classes()
