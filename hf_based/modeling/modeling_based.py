"""BASED-family causal language models (BASED, Arora et al. 2024; LoLCATs, Zhang et al. 2024) for transformers 5.x.

A Llama-style pre-norm stack (RMSNorm, SwiGLU MLP, RoPE where a mixer uses it) in which every layer has its own
token mixer, chosen by `config.mixer_types`. The mixers' math lives in `hf_based.kernels`; this file only
projects, masks, caches and dispatches between the parallel (training/prefill) and recurrent (decode) forms.
"""

import math
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hf_based.kernels import (
    add_rms_norm,
    apply_rotary,
    hedgehog_feature_map,
    hybrid_attention,
    hybrid_attention_recurrent,
    linear_attention,
    linear_attention_recurrent,
    retrieval_scores,
    rms_norm,
    short_conv,
    short_conv_recurrent,
    silu_mul,
    softmax_attention,
    taylor_feature_map,
    taylor_linear_attention,
    taylor_linear_attention_recurrent,
)
from hf_based.kernels.hybrid.reference import index_mask
from hf_based.kernels.retrieval.reference import RETRIEVAL_QUERIES
from hf_based.modeling.cache import BasedCache, all_real, attention_sinks
from hf_based.modeling.compat import CACHE_FIELD
from hf_based.modeling.configuration_based import BasedConfig
from hf_based.modeling.prefill_graphs import PrefillGraphs


class BasedRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def add_and_norm(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + hidden_states, the norm of that sum), in one kernel on a GPU."""
        return add_rms_norm(hidden_states, residual, self.weight, self.variance_epsilon)


class BasedRotaryEmbedding(nn.Module):
    """Llama's RoPE, including its scaled variants (`rope_parameters["rope_type"]`, e.g. "llama3")."""

    def __init__(self, config: BasedConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type == "default":
            inv_freq, self.attention_scaling = self.compute_default_rope_parameters(config)
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: BasedConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def residual_projection(linear: nn.Linear) -> nn.Linear:
    """Mark a projection that writes into the residual stream (its init is scaled down, see `_init_weights`)."""
    linear.is_residual_projection = True
    return linear


def real_keys(key_mask: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """The key mask [B, T], or every key real where there is none (what a cache keeps beside its keys)."""
    return key_mask if key_mask is not None else torch.ones(keys.shape[:2], dtype=torch.bool, device=keys.device)


def repeat_kv(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[B, T, Hkv, D] -> [B, T, Hkv * num_groups, D], each kv head serving `num_groups` query heads."""
    return x if num_groups == 1 else x.repeat_interleave(num_groups, dim=2)


class BasedMLP(nn.Module):
    def __init__(self, config: BasedConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = residual_projection(
            nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        )
        self.act_fn = ACT2FN[config.hidden_act]
        self.silu = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu_mul(gate, up) if self.silu else self.act_fn(gate) * up)


class BasedHedgehogFeatureMap(nn.Module):
    """LoLCATs' learned feature map phi(x) = [softmax(xW), softmax(-xW)], one W [D, F] per head."""

    def __init__(self, num_heads: int, input_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, input_dim, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hedgehog_feature_map(x, self.weight)

    def conversion_parameters(self) -> tuple[str, ...]:
        """Names of the parameters that a converted teacher lacks (`init_conversion_parameters` sets them)."""
        return ("weight",)

    @torch.no_grad()
    def init_conversion_parameters(self) -> None:
        """LoLCATs' init (`--lk_zero_init`): each head's W is the rectangular identity, phi starts as softmax(+-x)."""
        eye = torch.eye(*self.weight.shape[1:], dtype=self.weight.dtype, device=self.weight.device)
        init.copy_(self.weight, eye.expand_as(self.weight))


class BasedTaylorFeatureMap(nn.Module):
    """BASED's 2nd-order Taylor map (no parameters), as a module so mixers treat both maps alike."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return taylor_feature_map(x)


class BasedAttentionBase(nn.Module):
    """q/k/v/o projections shared by the attention-family mixers, named and shaped like Llama's.

    Llama-shaped layers project q/k to head_dim with GQA and apply RoPE; BASED-shaped linear attention projects q/k
    to `feature_dim` per head, without RoPE and without GQA.
    """

    def __init__(self, config: BasedConfig, layer_idx: int, llama_shaped: bool = True):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads if llama_shaped else config.num_attention_heads
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        self.qk_dim = config.head_dim if llama_shaped else config.feature_dim
        self.use_rope = llama_shaped
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.qk_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = residual_projection(nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias))

    def project(self, hidden_states, position_embeddings):
        """-> q [B, T, H, Dqk], k [B, T, Hkv, Dqk], v [B, T, Hkv, D]."""
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.qk_dim)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.qk_dim)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rotary(q, k, *position_embeddings)
        return q, k, v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        return self.o_proj(o.flatten(2))


class BasedLinearAttention(BasedAttentionBase):
    """Causal linear attention: o_t = sum_j phi(q_t).phi(k_j) v_j / (sum_j phi(q_t).phi(k_j) + eps)."""

    def __init__(self, config: BasedConfig, layer_idx: int):
        super().__init__(config, layer_idx, llama_shaped=config.linear_attention_projections == "llama")
        self.eps = config.linear_attention_eps
        self.hedgehog = config.feature_map == "hedgehog"
        if self.hedgehog:
            self.feature_map_q = BasedHedgehogFeatureMap(self.num_heads, self.qk_dim, config.hedgehog_dim)
            self.feature_map_k = BasedHedgehogFeatureMap(self.num_heads, self.qk_dim, config.hedgehog_dim)

    def forward(self, hidden_states, key_mask, position_embeddings, cache=None):
        q, k, v = self.project(hidden_states, position_embeddings)
        k, v = repeat_kv(k, self.num_kv_groups), repeat_kv(v, self.num_kv_groups)
        initial_state = cache.layers[self.layer_idx].state() if cache is not None else None
        decode = initial_state is not None and q.shape[1] == 1
        if self.hedgehog:
            op = linear_attention_recurrent if decode else linear_attention
            q, k = self.feature_map_q(q), self.feature_map_k(k)
        else:
            op = taylor_linear_attention_recurrent if decode else taylor_linear_attention
        o, final_state = op(
            q, k, v, key_mask=key_mask, initial_state=initial_state, output_final_state=cache is not None, eps=self.eps
        )
        if cache is not None:
            cache.layers[self.layer_idx].update_state(*final_state)
        return self.out(o)


class BasedAttention(BasedAttentionBase):
    """Causal softmax attention, over all keys (`full_attention`) or the last `sliding_window` keys."""

    def __init__(self, config: BasedConfig, layer_idx: int, window: int | None):
        super().__init__(config, layer_idx)
        self.window = window

    def forward(self, hidden_states, key_mask, position_embeddings, cache=None):
        q, k, v = self.project(hidden_states, position_embeddings)
        if cache is not None:
            k, v, cached_mask = cache.layers[self.layer_idx].update(k, v, real_keys(key_mask, k))
            if key_mask is not None or k.shape[1] != q.shape[1]:  # else the new keys alone, none padded: no mask
                key_mask = cached_mask
        return self.out(softmax_attention(q, k, v, window=self.window, key_mask=key_mask))


def factor_logit(factor: float) -> float:
    """The parameter whose sigmoid is `factor` (window and linear factors are stored as logits)."""
    return math.log(factor / (1 - factor))


class BasedHybridAttention(BasedAttentionBase):
    """LoLCATs: softmax over the last `sliding_window` keys + linear attention over all older keys, one denominator.

    The softmax part is weighted by a learned per-head gamma = sigmoid(window_factors) (init
    `hybrid_window_factor_init`); with `hybrid_linear_factor_init` in (0, 1), the linear part too, by beta =
    sigmoid(linear_factors) (None: beta = 1); with 0 there is no linear part (nor feature maps): sliding-window softmax
    over the window and the sinks.
    Keys leaving the window fold into the linear state, so the cache stays constant-size; the first
    `hybrid_attention_sinks` real tokens stay in the softmax part instead (the cache keeps them).
    """

    def __init__(self, config: BasedConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.window = config.sliding_window
        self.sinks = config.hybrid_attention_sinks
        self.factor_inits = {"window_factors": config.hybrid_window_factor_init}
        self.window_factors = nn.Parameter(torch.empty(self.num_heads))
        self.linear_factors = self.feature_map_q = self.feature_map_k = None
        if config.has_linear_term("hybrid_attention"):
            if config.hybrid_linear_factor_init is not None:
                self.factor_inits["linear_factors"] = config.hybrid_linear_factor_init
                self.linear_factors = nn.Parameter(torch.empty(self.num_heads))
            if config.feature_map == "hedgehog":
                self.feature_map_q = BasedHedgehogFeatureMap(self.num_heads, self.head_dim, config.hedgehog_dim)
                self.feature_map_k = BasedHedgehogFeatureMap(self.num_heads, self.head_dim, config.hedgehog_dim)
            else:
                self.feature_map_q = self.feature_map_k = BasedTaylorFeatureMap()

    def conversion_parameters(self) -> tuple[str, ...]:
        """Names of the parameters that a converted teacher lacks (the feature maps name their own)."""
        return tuple(self.factor_inits)

    @torch.no_grad()
    def init_conversion_parameters(self) -> None:
        """Each factor at its initial value from the config; the parameter holds its logit (logit(0.9) = 2.1972,
        LoLCATs' logit(0.1) = -2.1972)."""
        for name, factor in self.factor_inits.items():
            init.constant_(getattr(self, name), factor_logit(factor))

    def forward(self, hidden_states, key_mask, position_embeddings, cache=None):
        q, k, v = self.project(hidden_states, position_embeddings)
        initial_state = None
        # The op's sink arguments; max_sinks bounds any row's sinks, so that it need not read their count on the host.
        sinks = {"sink_mask": None, "max_sinks": self.sinks}
        if cache is not None:
            layer = cache.layers[self.layer_idx]
            initial_state = layer.state()
            choosing = min(q.shape[1], RETRIEVAL_QUERIES)  # the last queries, which choose the retrieval keys
            key_scores = (lambda keys, mask: retrieval_scores(q[:, -choosing:], keys, mask)) if q.shape[1] > 1 else None
            k, v, key_mask, kept = layer.update_with_sinks(k, v, real_keys(key_mask, k), key_scores)
            if kept is not None:
                form = "index" if kept.by_position else "mask"
                sinks = {f"sink_{form}": kept.sinks, "max_sinks": kept.count}
                if kept.chosen is not None:
                    # The prefill's last window of queries (and at least the choosing ones) sees the retrieval keys,
                    # as every later query will (from the cache); the earlier ones see only what was kept before.
                    late_queries, most = max(self.window, RETRIEVAL_QUERIES), layer.sinks + layer.retrieval
                    sinks |= {f"late_sink_{form}": kept.chosen, "late_queries": late_queries, "max_late_sinks": most}
        elif self.sinks:
            sinks["sink_mask"] = attention_sinks(real_keys(key_mask, k).bool(), self.sinks)
        q_feat, k_feat = self.features(q, k)
        op = hybrid_attention
        if initial_state is not None and q.shape[1] == 1:  # the decode step takes its sinks as a mask
            sink_mask = sinks.get("sink_mask")
            if "sink_index" in sinks:
                sink_mask = index_mask(sinks["sink_index"], k.shape[1])
            op, sinks = hybrid_attention_recurrent, {"sink_mask": sink_mask}
        window_factors = torch.sigmoid(self.window_factors)
        state = {"initial_state": initial_state, "output_final_state": cache is not None}
        o, final_state = op(q, k, v, q_feat, k_feat, window_factors, self.window, key_mask=key_mask, **state, **sinks)
        if cache is not None:
            layer.update_state(*final_state)
        return self.out(o)

    def features(self, q, k):
        """(phi(q) [B, Tq, H, F], phi(k) [B, Tk, H, F]); without a linear term, no features (F = 0): the hybrid
        kernels then add nothing to the window's softmax and keep an empty state."""
        if self.feature_map_q is None:
            return q.new_empty(*q.shape[:-1], 0), k.new_empty(*k.shape[:2], self.num_heads, 0)
        q_feat = self.feature_map_q(q)
        if self.linear_factors is not None:  # beta on phi(q) weighs the linear part in numerator and denominator
            q_feat = q_feat * torch.sigmoid(self.linear_factors).to(q_feat.dtype)[:, None]
        # Only the first Tk - window + 1 keys ever enter the linear part or the state (the window's softmax reads raw
        # keys): a decode step maps the one key that leaves the window, not all of it. The rest stay zero.
        folding = max(k.shape[1] - self.window + 1, 0)
        k_feat = self.feature_map_k(repeat_kv(k[:, :folding], self.num_kv_groups))
        return q_feat, nn.functional.pad(k_feat, (0, 0, 0, 0, 0, k.shape[1] - folding))


class BasedConv(nn.Module):
    """BASED's BaseConv: out_proj(silu(causal_depthwise_conv(u1)) * u2), with [u1, u2] = in_proj(x)."""

    def __init__(self, config: BasedConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        channels = config.conv_intermediate_size
        self.in_proj = nn.Linear(config.hidden_size, 2 * channels)
        self.conv1d = nn.Conv1d(channels, channels, config.conv_kernel_size, groups=channels, bias=False)
        self.out_proj = residual_projection(nn.Linear(channels, config.hidden_size))

    def forward(self, hidden_states, key_mask, position_embeddings, cache=None):
        u, gate = self.in_proj(hidden_states).chunk(2, dim=-1)  # [B, T, C] each
        if key_mask is not None:  # a zero input is what the conv's own left padding feeds in (one launch)
            u = torch.where(key_mask[..., None], u, 0)
        state = cache.layers[self.layer_idx].state() if cache is not None else None
        initial_state = state[0] if state is not None else None
        op = short_conv_recurrent if initial_state is not None and u.shape[1] == 1 else short_conv
        u, final_state = op(
            u, self.conv1d.weight[:, 0], initial_state=initial_state, output_final_state=cache is not None
        )
        if cache is not None:
            cache.layers[self.layer_idx].update_state(final_state)
        return self.out_proj(silu_mul(u, gate))


def build_mixer(config: BasedConfig, layer_idx: int) -> nn.Module:
    mixer_type = config.mixer_types[layer_idx]
    if mixer_type == "linear_attention":
        return BasedLinearAttention(config, layer_idx)
    if mixer_type == "sliding_window_attention":
        return BasedAttention(config, layer_idx, window=config.sliding_window)
    if mixer_type == "full_attention":
        return BasedAttention(config, layer_idx, window=None)
    if mixer_type == "hybrid_attention":
        return BasedHybridAttention(config, layer_idx)
    return BasedConv(config, layer_idx)


class BasedDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BasedConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        # Attention-family mixers sit under `self_attn` so Llama attention weights load unchanged.
        if self.mixer_type == "base_conv":
            self.conv = build_mixer(config, layer_idx)
        else:
            self.self_attn = build_mixer(config, layer_idx)
        self.mlp = BasedMLP(config)
        self.input_layernorm = BasedRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = BasedRMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def mixer(self) -> nn.Module:
        return self.conv if self.mixer_type == "base_conv" else self.self_attn

    def forward(self, hidden_states, key_mask=None, position_embeddings=None, cache=None):
        residual = hidden_states
        hidden_states = self.mixer(self.input_layernorm(hidden_states), key_mask, position_embeddings, cache)
        hidden_states, normed = self.post_attention_layernorm.add_and_norm(hidden_states, residual)
        return hidden_states + self.mlp(normed)


class BasedPreTrainedModel(PreTrainedModel):
    config_class = BasedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BasedDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _is_stateful = True
    _supports_sdpa = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (BasedHedgehogFeatureMap, BasedHybridAttention)):
            module.init_conversion_parameters()
        elif getattr(module, "is_residual_projection", False):  # GPT-2/BASED: scaled by 1/sqrt(2 * num_layers)
            init.normal_(module.weight, mean=0.0, std=std / (2 * self.config.num_hidden_layers) ** 0.5)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward() builds a BasedCache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_length):
        """generate()'s cache is a BasedCache (transformers' caches do not fit our mixers): static, sized for the
        generation's `max_length` (or `max_cache_len` if larger), with cache_implementation="static"."""
        implementation = generation_config.cache_implementation
        if model_kwargs.get(CACHE_FIELD) is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_length
            )
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by BASED-family models; accepted: "
                "dynamic (the default), static"
            )
        max_cache_len = None
        if implementation == "static":
            max_cache_len = max(max_length, generation_config.max_cache_len or 0)
        model_kwargs[CACHE_FIELD] = BasedCache(self.config, max_cache_len=max_cache_len)

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        """Compiled decoding only when asked for with a `compile_config` (transformers compiles every static-cache
        generation on CUDA by default): compiling around our Triton kernels is not yet verified on a GPU."""
        return generation_config.compile_config is not None and super()._valid_auto_compile_criteria(
            model_kwargs, generation_config
        )

    def get_compiled_call(self, compile_config):
        """transformers' compiled forward for the decoding steps, with the cache's token counters kept outside it: the
        step checks the cache's room and counts its tokens in Python around the compiled call, so the compiled graph
        reads no Python int that changes from step to step (no recompiles, no dynamic ints for CUDA graphs)."""
        compiled = super().get_compiled_call(compile_config)

        def step(**kwargs):
            cache = kwargs.get(CACHE_FIELD)
            if not isinstance(cache, BasedCache):
                return compiled(**kwargs)
            inputs = kwargs.get("input_ids")
            length = (inputs if inputs is not None else kwargs["inputs_embeds"]).shape[1]
            cache.check_capacity(length)
            cache.read_flags()
            cache.counted_outside_forward = True
            try:
                outputs = compiled(**kwargs)
            finally:
                cache.counted_outside_forward = False
            cache.advance(length)
            return outputs

        return step

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, **kwargs):
        """generate() asks for attention masks when the cache is compileable (static). Our mixers need only the
        padding mask of the new tokens (the cache keeps the older ones): {"key_mask": [batch, time]}, whose shape,
        unlike the growing 2D mask's, is the same at every decoding step, so the compiled step is not recompiled or
        re-captured as the generation goes on."""
        if attention_mask is None:
            return None
        # A copy: a slice of the growing mask has a new stride at every step (even at batch 1, where contiguous()
        # keeps the view), which would recompile.
        return {"key_mask": attention_mask[:, -inputs_embeds.shape[1] :].clone(memory_format=torch.contiguous_format)}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes `auto_map` and remote-code files, so the checkpoint loads with `trust_remote_code=True`."""
        self.config.auto_map = REMOTE_CODE_AUTO_MAP
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        for filename, source in REMOTE_CODE_FILES.items():
            Path(save_directory, filename).write_text(source)


def check_input_shapes(input_shape: tuple[int, int], attention_mask: torch.Tensor | None, past: int) -> None:
    """ValueError for an input without tokens, or a padding mask that is not [batch, past + time]: plain shape
    checks, before any tensor is computed (a mask of another length would silently shift every position)."""
    batch, length = input_shape
    if length == 0:
        raise ValueError(f"the input has no tokens (shape {input_shape}); pass at least one token per sequence")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + length):
        raise ValueError(
            f"attention_mask must be a 2D padding mask [batch, past + time] = [{batch}, {past} + {length}] for "
            f"{batch} sequences of {length} new tokens after {past} cached ones, got shape "
            f"{tuple(attention_mask.shape)}"
        )


class BasedModel(BasedPreTrainedModel):
    def __init__(self, config: BasedConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(BasedDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = BasedRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = BasedRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape [batch, time], got {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache, cache = False, None  # checkpoint replays would update the states twice
        if use_cache and cache is None:
            cache = BasedCache(self.config)
        if cache is not None and not isinstance(cache, BasedCache):
            raise TypeError(f"cache must be a BasedCache, got {type(cache).__name__}")
        past = cache.get_seq_length() if cache is not None else 0

        if cache is not None and not cache.counted_outside_forward:
            cache.check_capacity(length)
        key_mask = None
        if isinstance(attention_mask, dict):  # create_masks_for_generate's: the new tokens' mask only
            key_mask = attention_mask["key_mask"].bool()
            attention_mask = None
            if tuple(key_mask.shape) != (batch, length):
                raise ValueError(
                    f"attention_mask['key_mask'] must be [batch, time] = [{batch}, {length}], got {tuple(key_mask.shape)}"
                )
            if position_ids is None:
                raise ValueError("an attention_mask of the new tokens only ({'key_mask': mask}) needs position_ids")
        check_input_shapes(tuple(inputs_embeds.shape[:2]), attention_mask, past)
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            key_mask = attention_mask[:, -length:]
        if position_ids is None:
            if attention_mask is not None:  # count real tokens only, as generate() does for left padding
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None]
        if key_mask is not None and length > 1 and past == 0 and all_real(key_mask):  # a decode step stops at length
            key_mask = None  # no padding: softmax layers run plain causal attention (caches make their own masks)
        if key_mask is None and cache is not None and past > 0:
            key_mask = torch.ones(batch, length, dtype=torch.bool, device=inputs_embeds.device)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states, key_mask=key_mask, position_embeddings=position_embeddings, cache=cache
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None and not cache.counted_outside_forward:
            cache.advance(length)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **{CACHE_FIELD: cache if use_cache else None},
        )


class BasedForCausalLM(BasedPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BasedConfig):
        super().__init__(config)
        self.model = BasedModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.prefill_graphs: PrefillGraphs | None = None
        self.post_init()

    def generate(self, inputs=None, *args, attention_mask=None, **kwargs):
        # generate() derives positions from the mask before forward() sees it: a mask of the wrong length would fail
        # deep in a layer. A passed cache's tokens are part of the mask; forward() checks that case.
        prompt = next(
            (x for x in (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if x is not None), None
        )
        cached = kwargs.get("past_key_values") is not None
        if prompt is not None and prompt.dim() >= 2 and not cached:
            check_input_shapes(tuple(prompt.shape[:2]), attention_mask, past=0)
        return super().generate(inputs, *args, attention_mask=attention_mask, **kwargs)

    def enable_prefill_graphs(self, max_shapes: int = 4) -> None:
        """Capture inference prefills into an empty cache (as `generate()` runs them) in CUDA graphs, one per input
        shape up to `max_shapes`, and replay them for later prompts of that shape: a small model's eager prefill is
        host-bound. The first prefill of a shape costs about three eager ones. See `prefill_graphs.py`."""
        self.prefill_graphs = PrefillGraphs(self, max_shapes)

    def disable_prefill_graphs(self) -> None:
        """Back to eager prefills; frees the captured graphs."""
        self.prefill_graphs = None

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        logits_to_keep=0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        graphs = self.prefill_graphs
        if (
            graphs is not None
            and labels is None
            and not output_hidden_states
            and use_cache is not False
            and graphs.applies(input_ids, inputs_embeds, cache, attention_mask, position_ids, logits_to_keep)
        ):
            return graphs(input_ids, attention_mask, position_ids, cache, logits_to_keep)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


# Remote code: thin modules that re-export the installed package's classes, so a checkpoint loads through
# `auto_map` in a process that never imported hf_based (hf_based must be installed).
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_based.BasedConfig",
    "AutoModel": "modeling_based.BasedModel",
    "AutoModelForCausalLM": "modeling_based.BasedForCausalLM",
}
REMOTE_CODE_FILES = {
    "configuration_based.py": '"""Remote-code entry point; the code lives in the `hf-based` package."""\n'
    "from hf_based.modeling.configuration_based import BasedConfig\n",
    "modeling_based.py": '"""Remote-code entry point; the code lives in the `hf-based` package."""\n'
    "from hf_based.modeling.modeling_based import BasedForCausalLM, BasedModel\n",
}

__all__ = ["BasedPreTrainedModel", "BasedModel", "BasedForCausalLM"]
