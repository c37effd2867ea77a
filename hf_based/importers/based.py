"""Import the released HazyResearch BASED checkpoints (based-360m, based-1b, based-1b-50b) into hf-based format.

An original checkpoint is a `config.json` (a GPT2Config whose mixers are hydra dicts: `mixer` = BaseConv on most
layers, `alt_mixer` = Taylor linear attention on `alt_mixer_layers`, `alt_mixer_2` = sliding-window attention on
`alt_mixer_2_layers`) and a `pytorch_model.bin` saved from a Lightning module (keys `model.transformer.*`, plus
training-metric buffers). This follows `GPTLMHeadModel.from_pretrained_hf` of HazyResearch/based
(based/models/gpt.py) and maps every tensor onto `BasedForCausalLM`, whose mixers compute the same functions.
"""

import json
import math
import re
from pathlib import Path

import torch

from hf_based.errors import CheckpointError
from hf_based.importers.common import is_count, load_tensors, resolve_source, save_checkpoint
from hf_based.modeling import BasedConfig, BasedForCausalLM
from hf_based.outputs import check_output_directory
from hf_based.tokenizer import load_tokenizer
from hf_based.utils import torch_dtype

WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")

# Mixer dicts name a class by hydra `_target_`; these are the classes of the released models.
MIXER_CLASSES = {"mixer": "BaseConv", "alt_mixer": "LinearAttention", "alt_mixer_2": "SlidingAttention"}

# GPT2MixerConfig settings: (value the BASED architecture needs, default when the key is absent). Any other value
# builds a different network (LayerNorm, GELU MLP, biases, partial or interleaved RoPE, ...).
REQUIRED_SETTINGS = {
    "rms_norm": (True, False),
    "activation_function": ("swiglu", "gelu_new"),
    "mlp_fc1_bias": (False, True),
    "mlp_fc2_bias": (False, True),
    "prenorm": (True, True),
    "parallel_block": (False, False),
    "word_embed_proj_dim": (None, None),
    "lm_head_bias": (False, False),
}
WINDOW_SETTINGS = {  # read by the sliding-window layers only (`sliding_window_additions` in gpt.py)
    "qkv_proj_bias": (False, True),
    "out_proj_bias": (False, True),
    "rotary_emb_fraction": (1, 0.0),
    "rotary_emb_interleaved": (False, False),
    "rotary_emb_scale_base": (None, None),
    "scale_attn_weights": (True, True),
    "scale_attn_by_inverse_layer_idx": (False, False),
}

# Denominator eps of the linear attention per `parallel_implementation`: LinearAttention's own `eps` (default 1e-12)
# for the PyTorch paths; flash-linear-attention's parallel_based / fused_chunk_based add a fixed 1e-6 instead.
FLA_EPS = 1e-6
LINEAR_IMPLEMENTATIONS = ("quadratic", "linear", "fla_parallel", "fla_chunk")

EMBEDDINGS = "transformer.embeddings.word_embeddings.weight"
LINEAR_ATTENTION_NAMES = {"proj_q": "q_proj", "proj_k": "k_proj", "proj_v": "v_proj", "out_proj": "o_proj"}


def _setting(cfg: dict, key: str, required, default) -> None:
    value = cfg.get(key, default)
    if value != required:
        raise CheckpointError(f"config.json: {key}={value!r} is not supported; BASED models need {key}={required!r}")


def _mixer_settings(cfg: dict, key: str) -> dict:
    settings = cfg.get(key)
    target = settings.get("_target_", "") if isinstance(settings, dict) else None
    if target is None or target.rsplit(".", 1)[-1] != MIXER_CLASSES[key]:
        raise CheckpointError(
            f"config.json: {key}={settings!r} is not supported; accepted: a dict with _target_ ending in "
            f"{MIXER_CLASSES[key]!r}"
        )
    return settings


def _required(cfg: dict, key: str) -> int:
    """A size setting that must be there: an integer >= 1."""
    value = cfg.get(key)
    if value is None:
        raise CheckpointError(f"config.json has no {key!r}; is this a HazyResearch BASED checkpoint?")
    if not is_count(value):
        raise CheckpointError(f"config.json: {key}={value!r} is not supported; accepted: an integer >= 1")
    return value


def linear_attention_eps(settings: dict) -> float:
    implementation = settings.get("parallel_implementation", "quadratic")
    if implementation not in LINEAR_IMPLEMENTATIONS:  # "tk" adds an output RMSNorm: a different model
        raise CheckpointError(
            f"config.json: alt_mixer.parallel_implementation={implementation!r} is not supported; accepted: "
            f"{', '.join(map(repr, LINEAR_IMPLEMENTATIONS))}"
        )
    return FLA_EPS if implementation.startswith("fla") else settings.get("eps", 1e-12)


def based_config_from_original(cfg: dict) -> BasedConfig:
    """The `BasedConfig` of an original BASED `config.json` (GPT2MixerConfig fields, mixer dicts)."""
    hidden, num_layers, heads = _required(cfg, "n_embd"), _required(cfg, "n_layer"), _required(cfg, "n_head")
    window_layers = list(cfg.get("alt_mixer_2_layers") or [])
    linear_layers = [i for i in cfg.get("alt_mixer_layers") or [] if i not in window_layers]  # alt_mixer_2 wins
    mixer_types = [
        "sliding_window_attention" if i in window_layers else "linear_attention" if i in linear_layers else "base_conv"
        for i in range(num_layers)
    ]
    for key, (required, default) in REQUIRED_SETTINGS.items():
        _setting(cfg, key, required, default)

    options = {}
    if "base_conv" in mixer_types:
        conv = _mixer_settings(cfg, "mixer")
        if not conv.get("use_bias", True):
            raise CheckpointError("config.json: mixer.use_bias=False is not supported; BaseConv needs use_bias=True")
        options.update(
            conv_intermediate_size=conv.get("expand_proj", 2) * hidden // 2,  # BaseConv.d_inner
            conv_kernel_size=conv.get("kernel_size", 3),  # the configs' `kernel_sizes: 3` is a typo BaseConv ignores
        )
    if "linear_attention" in mixer_types:
        linear = _mixer_settings(cfg, "alt_mixer")
        feature_dim = linear.get("feature_dim", 16)
        feature_map = linear.get("feature_map") or {}
        if linear.get("num_heads", 16) != heads or linear.get("head_dim", hidden // heads) != hidden // heads:
            raise CheckpointError(
                f"config.json: alt_mixer num_heads={linear.get('num_heads', 16)}, head_dim={linear.get('head_dim')} "
                f"is not supported; accepted: num_heads=n_head={heads}, head_dim=n_embd/n_head={hidden // heads}"
            )
        if str(feature_map.get("_target_", "")).rsplit(".", 1)[-1] != "TaylorExp" or (
            feature_map.get("input_dim", feature_dim) != feature_dim
        ):
            raise CheckpointError(
                f"config.json: alt_mixer.feature_map={feature_map!r} is not supported; accepted: TaylorExp with "
                f"input_dim=feature_dim={feature_dim}"
            )
        if linear.get("use_decay_proj"):
            raise CheckpointError("config.json: alt_mixer.use_decay_proj=True (a decayed attention) is not supported")
        options.update(feature_dim=feature_dim, linear_attention_eps=linear_attention_eps(linear))
    if "sliding_window_attention" in mixer_types:
        window = _mixer_settings(cfg, "alt_mixer_2")
        for key, (required, default) in WINDOW_SETTINGS.items():
            _setting(cfg, key, required, default)
        # SlidingAttention passes window=(window_size // 2, 0) to flash-attn: that many keys to the left + the query.
        options.update(
            sliding_window=window.get("window_size", 128) // 2 + 1,
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rotary_emb_base", 10000.0))},
        )

    multiple = cfg.get("pad_vocab_size_multiple", 1)
    if not is_count(multiple):
        raise CheckpointError(
            f"config.json: pad_vocab_size_multiple={multiple!r} is not supported; accepted: an integer >= 1"
        )
    try:
        return BasedConfig(
            vocab_size=math.ceil(_required(cfg, "vocab_size") / multiple) * multiple,  # GPTModel pads the vocabulary
            hidden_size=hidden,
            intermediate_size=_required(cfg, "n_inner"),
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("n_head_kv") or heads,
            mixer_types=mixer_types,
            feature_map="taylor",
            linear_attention_projections="based",
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
            rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            **options,
        )
    except ValueError as error:
        raise CheckpointError(f"config.json describes a model hf-based cannot build: {error}") from error


def original_layout(config: BasedConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor an original checkpoint of `config` holds (after `model.` is stripped)."""
    d, inner, conv = config.hidden_size, config.intermediate_size, config.conv_intermediate_size
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layout = {EMBEDDINGS: (config.vocab_size, d), "transformer.ln_f.weight": (d,)}
    if not config.tie_word_embeddings:
        layout["lm_head.weight"] = (config.vocab_size, d)
    for i, mixer in enumerate(config.mixer_types):
        p = f"transformer.layers.{i}."
        layout |= {
            p + "norm1.weight": (d,),
            p + "norm2.weight": (d,),
            p + "mlp.fc1.weight": (2 * inner, d),
            p + "mlp.fc2.weight": (d, inner),
        }
        if mixer == "base_conv":
            layout |= {
                p + "mixer.in_proj.weight": (2 * conv, d),
                p + "mixer.in_proj.bias": (2 * conv,),
                p + "mixer.conv.conv.weight": (conv, 1, config.conv_kernel_size),
                p + "mixer.out_proj.weight": (d, conv),
                p + "mixer.out_proj.bias": (d,),
            }
        elif mixer == "linear_attention":
            layout |= {
                p + "mixer.proj_q.weight": (heads * config.feature_dim, d),
                p + "mixer.proj_k.weight": (heads * config.feature_dim, d),
                p + "mixer.proj_v.weight": (heads * head_dim, d),
                p + "mixer.out_proj.weight": (d, heads * head_dim),
            }
        else:
            layout |= {
                p + "mixer.Wqkv.weight": ((heads + 2 * kv_heads) * head_dim, d),
                p + "mixer.out_proj.weight": (d, heads * head_dim),
            }
    return layout


def _drop_extras(state: dict, cfg: dict) -> dict:
    """Strip `model.` and drop what carries no weights: Lightning metric buffers (as from_pretrained_hf does) and
    the fixed-decay buffer, which LinearAttention never reads without `use_decay_proj`."""
    state = {re.sub(r"^model\.", "", key): value for key, value in state.items() if "metrics" not in key}
    if cfg.get("fixed_decay"):
        state.pop("transformer.decay.decay", None)
    return state


def check_layout(state: dict, config: BasedConfig, source: str) -> dict:
    """Validate keys and shapes against `original_layout`; resolve tied embeddings. Returns the state to convert."""
    state = dict(state)
    if config.tie_word_embeddings and "lm_head.weight" in state:  # a tied module is saved under both names
        head = state.pop("lm_head.weight")
        if not torch.equal(state.setdefault(EMBEDDINGS, head), head):
            raise CheckpointError(
                f"{source}: lm_head.weight differs from {EMBEDDINGS} but config.json ties them "
                "(tie_word_embeddings is unset or true)"
            )
    layout = original_layout(config)
    problems = [
        f"{what} keys {keys[:5]}{' ...' if len(keys) > 5 else ''}"
        for what, keys in (
            ("missing", [k for k in layout if k not in state]),
            ("unexpected", [k for k in state if k not in layout]),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source} does not match config.json: {'; '.join(problems)}")
    for key, shape in layout.items():
        if not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            raise CheckpointError(f"{source}: {key} has shape {got}, config.json implies {shape}")
    return state


def convert_state_dict(state: dict, config: BasedConfig) -> dict:
    """Original keys (checked by `check_layout`) -> `BasedForCausalLM` state dict."""
    embeddings = state[EMBEDDINGS]
    ours = {
        "model.embed_tokens.weight": embeddings,
        "model.norm.weight": state["transformer.ln_f.weight"],
        "lm_head.weight": embeddings if config.tie_word_embeddings else state["lm_head.weight"],
    }
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    for i, mixer in enumerate(config.mixer_types):
        src, dst = f"transformer.layers.{i}.", f"model.layers.{i}."
        # GatedMlp: y, gate = fc1(x).chunk(2); fc2(y * silu(gate)), so fc1 stacks [up; gate].
        up, gate = state[src + "mlp.fc1.weight"].chunk(2)
        ours |= {
            dst + "input_layernorm.weight": state[src + "norm1.weight"],
            dst + "post_attention_layernorm.weight": state[src + "norm2.weight"],
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.down_proj.weight": state[src + "mlp.fc2.weight"],
        }
        if mixer == "base_conv":  # u1, u2 = split(in_proj(x)); out_proj(silu(conv(u1)) * u2), as BasedConv
            for name in ("in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias"):
                ours[dst + "conv." + name] = state[src + "mixer." + name]
            ours[dst + "conv.conv1d.weight"] = state[src + "mixer.conv.conv.weight"]
        elif mixer == "linear_attention":
            for theirs, name in LINEAR_ATTENTION_NAMES.items():
                ours[dst + f"self_attn.{name}.weight"] = state[src + f"mixer.{theirs}.weight"]
        else:  # SlidingAttention: Wqkv rows are [q heads; k heads; v heads] ("(three h d)" without GQA)
            q, k, v = state[src + "mixer.Wqkv.weight"].split([q_size, kv_size, kv_size])
            ours |= {
                dst + "self_attn.q_proj.weight": q,
                dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.o_proj.weight": state[src + "mixer.out_proj.weight"],
            }
    return ours


def read_config(path: Path) -> dict:
    """config.json as a dict; CheckpointError naming the file for bytes that are not a JSON object."""
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is not UTF-8 text: {error}") from error
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} holds a JSON {type(cfg).__name__}; accepted: a JSON object of model settings")
    return cfg


def load_original(src: str) -> tuple[dict, dict, str]:
    """-> (config.json dict, state dict, weight file name) of an original BASED checkpoint directory or hub id."""
    directory = resolve_source(src, ("config.json", *WEIGHT_FILES))
    if not directory.is_dir():
        raise CheckpointError(f"{src} is a file; SRC must be a checkpoint directory or hub id")
    weights = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if not (directory / "config.json").is_file() or weights is None:
        raise CheckpointError(f"{src} needs config.json and one of {', '.join(WEIGHT_FILES)}")
    cfg = read_config(directory / "config.json")
    state = load_tensors(weights)
    if not isinstance(state, dict):
        raise CheckpointError(f"{weights} holds a {type(state).__name__}, not a state dict")
    return cfg, state, weights.name


def import_based(src: str, out: str | Path, dtype: str = "auto", overwrite: bool = False) -> BasedForCausalLM:
    """Convert an original BASED checkpoint (directory or hub id) and save it, with the GPT-2 tokenizer, to `out`.

    dtype: "auto" keeps the checkpoint's dtype; else float32, bfloat16 or float16. Raises CheckpointError for
    unsupported input, UsageError when `out` holds a model and `overwrite` is not set. `out` is written whole or not
    at all.
    """
    target_dtype = torch_dtype(dtype)
    check_output_directory(out, overwrite)
    cfg, state, source = load_original(src)
    try:
        config = based_config_from_original(cfg)
    except (TypeError, AttributeError, ZeroDivisionError) as error:  # a setting of the wrong type or value
        raise CheckpointError(f"config.json of {src}: unusable settings ({type(error).__name__}: {error})") from error
    state = check_layout(_drop_extras(state, cfg), config, source)
    tokenizer = load_tokenizer()  # BASED was trained with the GPT-2 BPE ("<|endoftext|>" = 50256 as bos/eos)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = BasedForCausalLM(config).to(target_dtype or state[EMBEDDINGS].dtype)
    model.load_state_dict(convert_state_dict(state, config))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    save_checkpoint(model, tokenizer, out, overwrite)
    return model
