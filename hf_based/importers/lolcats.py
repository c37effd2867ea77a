"""Import released LoLCATs checkpoints onto their base Llama, as a hybrid `BasedForCausalLM` with LoRA merged.

LoLCATs (HazyResearch/lolcats) saves only the tensors it trained, as `{"model_state_dict": ..., "step": ...}` in a
`.pt` file (src/trainer/default_lm.py `save_trainable_weights`): attention transfer (`*_distill.pt`, hub
`.../lolcats-llama-3.1-8b-distill`) holds per layer `self_attn.feature_map_q.mlp.layer` and `feature_map_k.mlp.layer`
(hedgehog weights [heads, head_dim, F]) and `self_attn.window_factors` ([1, heads, 1, 1]); LoRA fine-tuning
(`*_ft.pt`, `...-ft-lora`) holds `self_attn.{q,k,v,o}_proj.lora_A/lora_B.<adapter>.weight` under PEFT names. LoLCATs
re-applies them to the base Llama (src/model/load_model.py); here they go into every layer's `hybrid_attention`.

The softmax window: LoLCATs' decode step attends to the last 64 keys, but its training/prefill masks
(`get_masks` in linear_window_attention_tk.py) are "terraced" 64-token blocks aligned to the end of the sequence: a
query sees 65-128 window keys; a 65-128-token sequence gets plain softmax attention, and in one of at most 64 tokens
every key counts in both the softmax and the linear term. `hybrid_attention` has one rule everywhere, the last
`sliding_window` keys, so window 64 reproduces LoLCATs' decode steps, not its prefill.
"""

import math
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from hf_based.conversion.linearize import based_config
from hf_based.conversion.recipe import LOLCATS, LOLCATS_LORA_ALPHA, LOLCATS_WINDOW, Recipe
from hf_based.errors import CheckpointError, ConversionError, UsageError
from hf_based.importers.common import is_count, load_tensors, save_checkpoint
from hf_based.modeling import BasedConfig, BasedForCausalLM
from hf_based.outputs import check_output_directory
from hf_based.utils import torch_dtype

# What attention transfer trains per layer (names after `layers.N.self_attn.`).
LOLCATS_PARAMETERS = ("feature_map_q.mlp.layer", "feature_map_k.mlp.layer", "window_factors")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Keys as saved from LolcatsLlamaForCausalLM (`model.layers...`) or its PEFT wrapper (`base_model.model.model...`).
_LAYER_KEY = re.compile(r"(?:base_model\.model\.)?(?:model\.)*layers\.(\d+)\.self_attn\.(.+)")
_LORA_KEY = re.compile(r"([qkvo]_proj)\.lora_([AB])\.[^.]+\.weight")


def llama_to_based_config(
    llama_config: PretrainedConfig, window: int = LOLCATS_WINDOW, hedgehog_dim: int = 64
) -> BasedConfig:
    """A LoLCATs hybrid `BasedConfig` for a Llama config: every layer `hybrid_attention` with hedgehog feature maps
    of `hedgehog_dim` on Llama-shaped q/k/v/o (RoPE, GQA), `window` softmax keys per query (itself included); the
    conversion's own mapping (`based_config`) with those settings."""
    return based_config(llama_config, Recipe(window=window, hedgehog_dim=hedgehog_dim, **LOLCATS))


def load_lolcats_checkpoint(path_or_id: str) -> dict[str, torch.Tensor]:
    """The `model_state_dict` of a LoLCATs `.pt` file, or of `model.pt` in a hub repository."""
    path = Path(path_or_id)
    if not path.exists():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(path_or_id, "model.pt"))
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"{path_or_id!r} is neither a local .pt file nor a hub repository with model.pt: {error}"
            ) from error
    checkpoint = load_tensors(path)
    state = checkpoint.get("model_state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors ({{'model_state_dict': {{key: tensor}}}})")
    return state


def parse_lolcats_state(state: dict[str, torch.Tensor], source: str) -> dict[tuple[int, str], tuple]:
    """-> {(layer, name): (tensor, where)}, name one of LOLCATS_PARAMETERS or "<proj>.lora_A" / "<proj>.lora_B"."""
    parsed = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.fullmatch(key)
        lora = match and _LORA_KEY.fullmatch(match[2])
        if lora:
            name = f"{lora[1]}.lora_{lora[2]}"
        elif match and match[2] in LOLCATS_PARAMETERS:
            name = match[2]
        else:
            raise CheckpointError(
                f"{source}: unexpected key {key!r}; accepted: layers.N.self_attn.<{' | '.join(LOLCATS_PARAMETERS)}> "
                "or self_attn.<q|k|v|o>_proj.lora_<A|B>.<adapter>.weight (optionally under model. / base_model.model.)"
            )
        parsed[int(match[1]), name] = (tensor, f"{source}: {key}")
    return parsed


def _take(parsed: dict, layer: int, name: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if (layer, name) not in parsed:
        raise CheckpointError(f"no {what} for layer {layer}: missing key layers.{layer}.self_attn.{name}")
    tensor, where = parsed.pop((layer, name))
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{where} has shape {tuple(tensor.shape)}, the base model implies {shape}")
    return tensor


def _lora_delta(parsed: dict, layer: int, proj: str, shape: tuple[int, int], lora_alpha: float) -> torch.Tensor | None:
    """PEFT's merged update (no rsLoRA, no DoRA): (lora_alpha / r) * B @ A, in at least fp32; None if not tuned."""
    a_name, b_name = f"{proj}.lora_A", f"{proj}.lora_B"
    if (layer, a_name) not in parsed and (layer, b_name) not in parsed:
        return None
    a = parsed.get((layer, a_name))
    rank = a[0].shape[0] if a else parsed[layer, b_name][0].shape[-1]
    a = _take(parsed, layer, a_name, (rank, shape[1]), "LoRA A")
    b = _take(parsed, layer, b_name, (shape[0], rank), "LoRA B")
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (lora_alpha / rank) * (b.to(dtype) @ a.to(dtype))


def lolcats_tensors(parsed: dict, config: BasedConfig, lora_alpha: float) -> tuple[dict, dict]:
    """Check LoLCATs' tensors against `config`; -> (feature maps and window factors, LoRA updates of q/k/v/o),
    keyed by our parameter names. Consumes `parsed`; anything left over is reported."""
    heads, head_dim, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
    kv_size = config.num_key_value_heads * head_dim
    projection_shapes = {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_size, hidden),
        "v_proj": (kv_size, hidden),
        "o_proj": (hidden, heads * head_dim),
    }
    feature_map_shape = (heads, head_dim, config.hedgehog_dim)  # FeatureMapMLP: einsum("hdf,bhld->bhlf")
    what = "attention-transfer weights (DISTILL_PT)"
    tensors, deltas = {}, {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        tensors[p + "feature_map_q.weight"] = _take(parsed, i, "feature_map_q.mlp.layer", feature_map_shape, what)
        tensors[p + "feature_map_k.weight"] = _take(parsed, i, "feature_map_k.mlp.layer", feature_map_shape, what)
        tensors[p + "window_factors"] = _take(parsed, i, "window_factors", (1, heads, 1, 1), what).flatten()
        for proj, shape in projection_shapes.items():
            delta = _lora_delta(parsed, i, proj, shape, lora_alpha)
            if delta is not None:
                deltas[p + proj + ".weight"] = delta
    if parsed:
        where = next(iter(parsed.values()))[1]
        raise CheckpointError(f"{where}: no such layer in the base model ({config.num_hidden_layers} layers)")
    return tensors, deltas


def import_lolcats(
    base_llama: str,
    distill: str,
    finetune: str | None,
    out: str | Path,
    window: int = LOLCATS_WINDOW,
    lora_alpha: float = LOLCATS_LORA_ALPHA,
    dtype: str = "auto",
    overwrite: bool = False,
) -> BasedForCausalLM:
    """Apply LoLCATs' attention-transfer (and optional LoRA fine-tune) checkpoints, local `.pt` files or hub repos
    holding `model.pt`, to `base_llama` (directory or hub id) and save the result with the base tokenizer to `out`.

    dtype: "auto" keeps the base model's dtype; else float32, bfloat16 or float16. Raises CheckpointError for
    unsupported input, UsageError for a window < 1, a lora_alpha that is not > 0, or an `out` holding a model
    without `overwrite`. `out` is written whole or not at all.
    """
    target_dtype = torch_dtype(dtype)
    if not is_count(window):
        raise UsageError(f"window={window!r}: the softmax window must be an integer >= 1 (keys per query)")
    if not (math.isfinite(lora_alpha) and lora_alpha > 0):  # a negative alpha would subtract the fine-tune
        raise UsageError(f"lora_alpha={lora_alpha!r} must be a finite number > 0 (the LoRA scale is lora_alpha / r)")
    check_output_directory(out, overwrite)
    parsed = parse_lolcats_state(load_lolcats_checkpoint(distill), distill)
    if finetune is not None:  # loaded after the distill state, as LoLCATs does: its tensors win
        parsed.update(parse_lolcats_state(load_lolcats_checkpoint(finetune), finetune))
    feature_maps = [tensor for (_, name), (tensor, _) in parsed.items() if name == "feature_map_q.mlp.layer"]
    if not feature_maps:
        raise CheckpointError(f"{distill} has no feature_map_q weights; is it a LoLCATs attention-transfer checkpoint?")

    # Everything LoLCATs saved is checked against the base config before the (large) base weights are read.
    try:
        llama_config = AutoConfig.from_pretrained(base_llama)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the base model config from {base_llama!r}: {error}") from error
    if llama_config.model_type != "llama":
        raise CheckpointError(f"{base_llama} is a {llama_config.model_type!r} model; accepted: 'llama'")
    try:
        config = llama_to_based_config(llama_config, window, hedgehog_dim=feature_maps[0].shape[-1])
    except (ConversionError, ValueError) as error:
        raise CheckpointError(str(error)) from error
    tensors, deltas = lolcats_tensors(parsed, config, lora_alpha)

    try:
        llama = AutoModelForCausalLM.from_pretrained(base_llama, dtype=target_dtype or "auto")
        tokenizer = AutoTokenizer.from_pretrained(base_llama)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the base model or its tokenizer from {base_llama!r}: {error}") from error
    state = llama.state_dict() | tensors  # Llama and BasedForCausalLM name the shared weights alike
    for key, delta in deltas.items():
        compute_dtype = torch.promote_types(state[key].dtype, delta.dtype)
        state[key] = (state[key].to(compute_dtype) + delta.to(compute_dtype)).to(state[key].dtype)
    model = BasedForCausalLM(config).to(llama.dtype)
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(f"{base_llama} is not a plain Llama: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state)
    model.generation_config = llama.generation_config
    save_checkpoint(model, tokenizer, out, overwrite)
    return model
