"""Differences between the transformers 5.x versions that hf-based supports.

transformers renamed the cache keyword argument and output field from `past_key_values` to `cache` during 5.x (its
models still accept `past_key_values` for a while, ours accept both): `CACHE_FIELD` is the name that the installed
version uses for both.
"""

from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(output: ModelOutput) -> Cache | None:
    """The cache a model's forward returned."""
    return getattr(output, CACHE_FIELD)
