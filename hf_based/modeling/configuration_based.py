"""Configuration of BASED-family models: one token mixer per layer, chosen from `MIXER_TYPES`."""

import math

from transformers import PretrainedConfig

from hf_based.kernels.feature_maps import taylor_num_features
from hf_based.modeling.presets import PRESETS, based_layer_pattern

# Our mixer names -> the transformers `layer_types` vocabulary (what cache/mask/parallelism code in transformers
# understands). `layer_types` is derived, never stored: transformers validates and remaps stored `layer_types`.
MIXER_TYPES = {
    "linear_attention": "linear_attention",
    "sliding_window_attention": "sliding_attention",
    "hybrid_attention": "hybrid_sliding",
    "base_conv": "linear_attention",
    "full_attention": "full_attention",
}
FEATURE_MAPS = ("taylor", "hedgehog")
LINEAR_ATTENTION_PROJECTIONS = ("based", "llama")


def _one_of(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted values: {', '.join(map(repr, accepted))}")


class BasedConfig(PretrainedConfig):
    r"""
    Configuration for [`BasedModel`] / [`BasedForCausalLM`].

    Mixers (`mixer_types`, one per layer):
        - `linear_attention`: causal linear attention with a feature map (`feature_map`): `taylor` (BASED:
          phi(x) = [1, x/d^(1/4), vec(x x^T)/(sqrt(2) sqrt(d))], so phi(q).phi(k) = 1 + s + s^2/2 with s = q.k/sqrt(d))
          or `hedgehog` (LoLCATs: [softmax(xW), softmax(-xW)] with a learned per-head W). With
          `linear_attention_projections="based"` q/k are projected to `feature_dim` per head, without RoPE; with
          `"llama"` q/k/v/o are shaped like Llama attention (head_dim, GQA, RoPE before the feature map).
        - `sliding_window_attention`: softmax attention over the last `sliding_window` keys, RoPE and GQA.
        - `hybrid_attention`: LoLCATs: softmax over the last `sliding_window` keys plus feature-map linear attention
          over all older keys, one shared denominator, learned per-head weight sigmoid(w) on the softmax part. With
          `hybrid_attention_sinks` = S > 0, the first S real tokens of each sequence stay in the softmax part for
          every later query (attention sinks) and out of the linear state; the cache keeps their keys and values.
          With `hybrid_retrieval_keys` = R > 0, a prefill through the cache (generation) also keeps the R older keys
          that its last 8 queries attend to most (each key's best weight among them, summed over the heads; a key that
          scores brings the 3 keys before it and the 11 after) in the softmax part of the prefill's last window of
          queries (`sliding_window` of them, the 8 among them) and of every later query; the prefill's earlier
          queries do not see them (their outputs never depend on later tokens).
          A forward with `use_cache=False` (training) keeps none; a plain forward in eval mode
          makes a cache (`use_cache` defaults to True), so lm-eval's scores include them.
        - `base_conv`: BASED's gated short convolution (in_proj, depthwise causal conv, SiLU gate, out_proj).
        - `full_attention`: ordinary causal softmax attention.

    `sliding_window` counts the keys a query sees *including itself* (transformers' convention). BASED's
    flash-attn `window_size=(128, 0)` (128 keys to the left + the current one) is `sliding_window=129`.
    """

    model_type = "based"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 50264
    hidden_size: int = 1024
    intermediate_size: int | None = None
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    mixer_types: list[str] | None = None
    feature_map: str = "taylor"
    feature_dim: int = 16
    hedgehog_dim: int = 64
    linear_attention_projections: str = "based"
    linear_attention_eps: float = 1e-12
    sliding_window: int = 129
    hybrid_window_factor_init: float = 0.1
    hybrid_linear_factor_init: float | None = None
    hybrid_attention_sinks: int = 0
    hybrid_retrieval_keys: int = 0
    conv_kernel_size: int = 3
    conv_intermediate_size: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_parameters: dict | None = None
    max_position_embeddings: int = 2048
    initializer_range: float | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256

    def __post_init__(self, **kwargs):
        if self.mixer_types is None:
            self.mixer_types = based_layer_pattern(self.num_hidden_layers, [1, 6, 11, 16, 21], [2, 7, 12, 17, 22])
        self.mixer_types = list(self.mixer_types)
        if self.head_dim is None and self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 2 * self.hidden_size
        if self.conv_intermediate_size is None:
            self.conv_intermediate_size = 2 * self.hidden_size
        if self.initializer_range is None:  # BASED's "special initializer"
            self.initializer_range = math.sqrt(2 / (5 * self.hidden_size))
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        self.validate_mixers()
        super().__post_init__(**kwargs)

    @property
    def layer_types(self) -> list[str]:
        return [MIXER_TYPES[m] for m in self.mixer_types]

    def validate_mixers(self):
        for i, mixer in enumerate(self.mixer_types):
            if mixer not in MIXER_TYPES:
                raise ValueError(
                    f"mixer_types[{i}]={mixer!r} is not a known mixer; accepted mixers: {', '.join(MIXER_TYPES)}"
                )
        if len(self.mixer_types) != self.num_hidden_layers:
            raise ValueError(
                f"mixer_types has {len(self.mixer_types)} entries but num_hidden_layers={self.num_hidden_layers}; "
                "give exactly one mixer per layer"
            )
        _one_of("feature_map", self.feature_map, FEATURE_MAPS)
        _one_of("linear_attention_projections", self.linear_attention_projections, LINEAR_ATTENTION_PROJECTIONS)
        for name in (
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "feature_dim",
            "hedgehog_dim",
            "sliding_window",
            "conv_kernel_size",
            "intermediate_size",
            "conv_intermediate_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is not supported; accepted values: integers >= 1")
        if self.head_dim is None:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                "set head_dim explicitly or use a hidden_size that is a multiple of num_attention_heads"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}; accepted values: divisors of num_attention_heads"
            )
        for name in ("hybrid_attention_sinks", "hybrid_retrieval_keys"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} is not supported; accepted values: integers >= 0")
        if not 0 < self.hybrid_window_factor_init < 1:
            raise ValueError(
                f"hybrid_window_factor_init={self.hybrid_window_factor_init!r} is not supported; "
                "accepted values: 0 < value < 1 (it is sigmoid(w) at initialisation)"
            )
        linear_factor = self.hybrid_linear_factor_init
        if linear_factor is not None and not (isinstance(linear_factor, (int, float)) and 0 <= linear_factor < 1):
            raise ValueError(
                f"hybrid_linear_factor_init={linear_factor!r} is not supported; accepted values: None (the linear "
                "term unweighted), 0 (no linear term) or 0 < value < 1 (a learned weight, sigmoid(w) at initialisation)"
            )

    def qk_head_dim(self, mixer_type: str) -> int:
        """Per-head size of the q/k vectors fed to the feature map in a layer of `mixer_type`."""
        based_shaped = mixer_type == "linear_attention" and self.linear_attention_projections == "based"
        return self.feature_dim if based_shaped else self.head_dim

    def has_linear_term(self, mixer_type: str) -> bool:
        """Whether a `linear_attention` / `hybrid_attention` layer has a linear part (hybrid_linear_factor_init 0:
        a hybrid layer is its window and sinks alone)."""
        return mixer_type != "hybrid_attention" or self.hybrid_linear_factor_init != 0

    def feature_size(self, mixer_type: str) -> int:
        """Features per head of the linear-attention state of a `linear_attention` / `hybrid_attention` layer."""
        if not self.has_linear_term(mixer_type):
            return 0  # no feature maps, no state
        if self.feature_map == "hedgehog":
            return 2 * self.hedgehog_dim
        return taylor_num_features(self.qk_head_dim(mixer_type))  # 1 + d + d^2, as cached (not the packed 1+d+d(d+1)/2)

    def recurrent_state_size(self, seq_len: int | None = None) -> list[int]:
        """Elements of generation state per sequence, one entry per layer, as `BasedCache` holds them after `seq_len`
        tokens (key masks not counted). Only `full_attention` layers depend on `seq_len` (their KV cache grows)."""
        heads, kv_heads, head_dim = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        sizes = []
        for mixer in self.mixer_types:
            window = (self.sliding_window - 1) * kv_heads * 2 * head_dim  # keys + values of the window buffer
            kept = (self.hybrid_attention_sinks + self.hybrid_retrieval_keys) * kv_heads * 2 * head_dim
            linear = heads * self.feature_size(mixer) * (head_dim + 1)  # kv [H, F, Dv] + z [H, F]
            if mixer == "full_attention" and seq_len is None:
                raise ValueError("full_attention layers keep every key: pass seq_len to recurrent_state_size")
            sizes.append(
                {
                    "linear_attention": linear,
                    "sliding_window_attention": window,
                    "hybrid_attention": window + kept + linear,
                    "base_conv": (self.conv_kernel_size - 1) * self.conv_intermediate_size,
                    "full_attention": (seq_len or 0) * kv_heads * 2 * head_dim,
                }[mixer]
            )
        return sizes


def preset_config(name: str, **overrides) -> BasedConfig:
    """A `BasedConfig` for a named preset (`PRESETS`), with optional field overrides."""
    _one_of("preset", name, tuple(PRESETS))
    return BasedConfig(**{**PRESETS[name], **overrides})
