"""LoLCATs linearization of Llama-family checkpoints: config mapping, weight transfer, attention transfer.

A Llama layer's attention becomes a BASED-family `hybrid_attention` mixer (softmax over a sliding window plus
hedgehog linear attention over older keys, Zhang et al. 2024) with the *same* q/k/v/o projections, which sit under
`self_attn` with Llama's names, so every weight drops in by name; only the feature maps and the per-head window
factors are new. `Recipe` (recipe.py) holds every knob of the conversion, with LoLCATs' defaults.

Attention transfer (stage 1) needs, for every converted layer, the teacher's softmax attention output (before
o_proj) on the same inputs. `AttentionTransfer` gets it without touching the model code: a forward pre-hook on the
attention module recomputes its q/k/v (the teacher's own projections) and the exact causal softmax attention, and a
forward hook on `o_proj` compares that with the converted layer's output (o_proj's input), records the MSE, and hands
the *teacher's* output on, as LoLCATs does, so every layer trains on the teacher's hidden states.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hf_based.conversion.recipe import Recipe
from hf_based.errors import ConversionError
from hf_based.kernels import softmax_attention
from hf_based.modeling import BasedConfig, BasedForCausalLM
from hf_based.modeling.modeling_based import (
    BasedHybridAttention,
    BasedLinearAttention,
    BasedRotaryEmbedding,
)

# model_type -> what differs from Llama. All three name their weights like Llama (model.layers.N.self_attn.q_proj...).
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama 2 / 3 / 3.1 / 3.2 (GQA, llama3 RoPE scaling, tied or untied embeddings, optional biases)",
    "mistral": "Mistral (Llama-shaped; its sliding_window, if any, is ignored: keep --seq-len within it)",
    "qwen2": "Qwen2 / Qwen2.5 (bias on q/k/v, none on o_proj)",
}
CONVERTED_MIXERS = ("hybrid_attention", "linear_attention")


def _get(config, name, default=None):
    value = getattr(config, name, default)
    return default if value is None else value


def check_supported(teacher_config) -> None:
    """Raise ConversionError unless `teacher_config` describes a decoder this module converts."""
    model_type = getattr(teacher_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        accepted = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise ConversionError(
            f"cannot convert a {model_type!r} checkpoint ({type(teacher_config).__name__}); supported model types "
            f"are Llama-family decoders with q_proj/k_proj/v_proj/o_proj attention and RoPE: {accepted}"
        )
    rope = _get(teacher_config, "rope_parameters", {}) or {}
    if not isinstance(rope, Mapping) or "rope_type" not in rope and any(isinstance(v, Mapping) for v in rope.values()):
        raise ConversionError(f"per-layer RoPE parameters ({rope!r}) are not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise ConversionError(
            f"RoPE type {rope_type!r} is not supported; accepted: default, {', '.join(ROPE_INIT_FUNCTIONS)}"
        )
    layer_types = getattr(teacher_config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ConversionError(
            f"the teacher mixes attention types ({sorted(set(layer_types))}); "
            "only full-attention teachers are supported"
        )
    if _get(teacher_config, "hidden_act", "silu") not in ("silu", "swish"):
        raise ConversionError(f"hidden_act={teacher_config.hidden_act!r} is not supported; accepted: silu")


def _layer_indices(indices: Sequence[int], num_layers: int, what: str) -> list[int]:
    out = []
    for i in indices:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ConversionError(f"{what} {i} is out of range for a model of {num_layers} layers")
        out.append(j)
    return sorted(set(out))


def based_config(teacher_config, recipe: Recipe | None = None) -> BasedConfig:
    """The BasedConfig of the converted model: the teacher's shapes, RoPE, norms and tokens; LoLCATs mixers. The
    recipe's softmax layers must be indices, or a selection spec that keeps none of this model's layers."""
    recipe = recipe or Recipe()
    recipe.validate()
    check_supported(teacher_config)
    num_layers = teacher_config.num_hidden_layers
    selection = recipe.layer_selection
    if selection is not None and selection.size(num_layers) > 0:
        raise ConversionError(
            f"softmax_layers={recipe.softmax_layers!r} is a selection spec: choose the layers first "
            "(layer_selection.select_softmax_layers; convert() does)"
        )
    # A spec that keeps no layer of this model (K = 0, or P% of too few layers) has nothing to choose.
    softmax = [] if selection is not None else _layer_indices(recipe.softmax_layers, num_layers, "softmax layer")
    converted = "linear_attention" if recipe.linear_only else "hybrid_attention"
    heads = teacher_config.num_attention_heads
    head_dim = _get(teacher_config, "head_dim", teacher_config.hidden_size // heads)
    qwen2 = teacher_config.model_type == "qwen2"
    eos = getattr(teacher_config, "eos_token_id", None)
    return BasedConfig(
        vocab_size=teacher_config.vocab_size,
        hidden_size=teacher_config.hidden_size,
        intermediate_size=teacher_config.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=_get(teacher_config, "num_key_value_heads", heads),
        head_dim=head_dim,
        mixer_types=["full_attention" if i in softmax else converted for i in range(num_layers)],
        feature_map=recipe.feature_map,
        hedgehog_dim=recipe.hedgehog_dim,
        linear_attention_projections="llama",
        sliding_window=recipe.window,
        hybrid_window_factor_init=recipe.window_factor_init,
        hybrid_linear_factor_init=recipe.linear_factor_init,
        hybrid_attention_sinks=recipe.sinks,
        hybrid_retrieval_keys=recipe.retrieval_keys,
        attention_bias=bool(qwen2 or _get(teacher_config, "attention_bias", False)),
        mlp_bias=bool(_get(teacher_config, "mlp_bias", False)),
        hidden_act=_get(teacher_config, "hidden_act", "silu"),
        rms_norm_eps=teacher_config.rms_norm_eps,
        rope_parameters=dict(_get(teacher_config, "rope_parameters", {"rope_type": "default", "rope_theta": 10000.0})),
        max_position_embeddings=_get(teacher_config, "max_position_embeddings", 2048),
        initializer_range=_get(teacher_config, "initializer_range", 0.02),
        tie_word_embeddings=bool(getattr(teacher_config, "tie_word_embeddings", False)),
        bos_token_id=getattr(teacher_config, "bos_token_id", None),
        eos_token_id=list(eos) if isinstance(eos, (list, tuple)) else eos,
        pad_token_id=None,  # a padding_idx would freeze that embedding row; generate() reads generation_config's
    )


def converted_layers(config: BasedConfig) -> list[int]:
    return [i for i, m in enumerate(config.mixer_types) if m in CONVERTED_MIXERS]


def conversion_modules(module: nn.Module):
    """(name, submodule) of each submodule holding parameters that a converted teacher lacks."""
    return [(name, sub) for name, sub in module.named_modules() if hasattr(sub, "conversion_parameters")]


def init_new_parameters(module: nn.Module, device=None) -> None:
    """(Re)create the parameters that the teacher lacks, with LoLCATs' init (each module's
    `init_conversion_parameters`: identity feature maps, window and linear factors from the config)."""
    for _, sub in conversion_modules(module):
        for name in sub.conversion_parameters():
            setattr(sub, name, nn.Parameter(torch.empty(getattr(sub, name).shape, device=device)))
        sub.init_conversion_parameters()


def load_weights(
    module: nn.Module,
    tensors: Callable[[str], torch.Tensor | None],
    config: BasedConfig,
    prefix: str = "",
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> None:
    """Fill a meta-device `module` (a BasedForCausalLM, or one of its layers with `prefix` = its name in the full
    model) with the teacher's tensors (`tensors(full_name)`, None if absent), creating the new parameters.

    Qwen2's o_proj has no bias: it gets zeros (with attention_bias=True all four projections have one).
    """
    new = {f"{owner}.{name}" for owner, sub in conversion_modules(module) for name in sub.conversion_parameters()}
    state, missing = {}, []
    for name in module.state_dict(keep_vars=True):
        full = prefix + name
        if name in new:
            continue
        tensor = tensors(full)
        if tensor is None and full.endswith("self_attn.o_proj.bias"):
            tensor = torch.zeros(config.hidden_size)
        if tensor is None and full == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if tensor is None:
            missing.append(full)
            continue
        # A copy: merging LoRA later writes into these weights, and the teacher must stay intact.
        state[name] = tensor.detach().to(device=device, dtype=dtype, copy=True)
    if missing:
        raise ConversionError(
            f"the teacher checkpoint lacks {len(missing)} weight(s) that a Llama-shaped model has, e.g. "
            f"{', '.join(missing[:4])}; it is not a supported Llama-family checkpoint"
        )
    module.load_state_dict(state, strict=False, assign=True)
    init_new_parameters(module, device=device)
    for sub in module.modules():
        if isinstance(sub, BasedRotaryEmbedding):  # non-persistent buffers: rebuilt, never loaded
            fresh = BasedRotaryEmbedding(config).to(device)
            sub.inv_freq, sub.original_inv_freq = fresh.inv_freq, fresh.original_inv_freq
    if isinstance(module, BasedForCausalLM) and config.tie_word_embeddings:
        module.lm_head.weight = module.model.embed_tokens.weight
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ConversionError(f"internal error: parameters left uninitialised: {', '.join(left[:5])}")


def teacher_tensors(teacher: nn.Module) -> Callable[[str], torch.Tensor | None]:
    """Look up the teacher's weights by name (a loaded model: its state dict, without copies)."""
    state = teacher.state_dict()
    extra = [n for n in state if "rotary_emb" not in n and not n.startswith(("model.", "lm_head."))]
    if extra:
        raise ConversionError(f"unexpected teacher weights {extra[:4]}: not a Llama-family causal LM")
    return state.get


def check_teacher_weights(teacher: nn.Module, config: BasedConfig) -> None:
    """Every teacher weight must have a place in the converted model (e.g. Qwen3's q_norm/k_norm have none)."""
    with torch.device("meta"):
        skeleton = BasedForCausalLM(config)
    ours = set(skeleton.state_dict())
    theirs = {n for n in teacher.state_dict() if "rotary_emb" not in n}
    unknown = sorted(theirs - ours)
    if unknown:
        raise ConversionError(
            f"the teacher has {len(unknown)} weight(s) that a Llama-shaped model lacks, e.g. {', '.join(unknown[:4])}; "
            "this architecture is not supported"
        )


def linearize_model(
    teacher: nn.Module, recipe: Recipe | None = None, dtype: torch.dtype = torch.float32, device="cpu"
) -> BasedForCausalLM:
    """The converted model before any training: the teacher's weights, new feature maps and window factors."""
    config = based_config(teacher.config, recipe)
    check_teacher_weights(teacher, config)
    with torch.device("meta"):
        student = BasedForCausalLM(config)
    load_weights(student, teacher_tensors(teacher), config, dtype=dtype, device=device)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = teacher.generation_config.__class__.from_dict(teacher.generation_config.to_dict())
    return student.eval()


def stage1_parameters(model: nn.Module, config: BasedConfig) -> dict[int, list[tuple[str, nn.Parameter]]]:
    """Per converted layer: the (name, parameter) pairs that attention transfer trains (feature maps, window and
    linear factors); none in layers without a linear term, where the window factor cancels out.
    Names are relative to `model` (a BasedForCausalLM, or anything whose named_parameters end the same)."""
    converted = {i for i in converted_layers(config) if config.has_linear_term(config.mixer_types[i])}
    groups: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        match = re.search(r"layers\.(\d+)\.self_attn\.(feature_map_[qk]\.weight|window_factors|linear_factors)$", name)
        if match and int(match.group(1)) in converted:
            groups.setdefault(int(match.group(1)), []).append((name, param))
    return groups


def stage1_optimizer(model: nn.Module, config: BasedConfig, recipe: Recipe):
    """Freeze `model` but what attention transfer trains; -> ({layer: its parameters}, their AdamW optimizer).
    Each layer's group is clipped on its own, so that block-wise training equals joint training."""
    groups = {layer: [p for _, p in group] for layer, group in stage1_parameters(model, config).items()}
    model.requires_grad_(False)
    params = [p for group in groups.values() for p in group]
    for p in params:
        p.requires_grad_(True)
    return groups, torch.optim.AdamW(params, lr=recipe.stage1_lr, weight_decay=recipe.weight_decay)


# --- attention transfer -------------------------------------------------------------------------------------------


def teacher_attention(q, k, v, key_mask=None) -> torch.Tensor:
    """Exact causal softmax attention, [B, T, H, D] (GQA k/v) -> [B, T, H * D], as the teacher's Llama attention
    computes it (scale head_dim^-0.5)."""
    if key_mask is None and q.shape[1] == k.shape[1]:
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=q.shape[2] != k.shape[2],
        ).transpose(1, 2)
    else:
        o = softmax_attention(q, k, v, key_mask=key_mask)
    return o.flatten(2)


@dataclass
class AttentionTransfer:
    """Context manager: while active, each attention module in `modules` ({layer index: self_attn}) records
    mse[layer] = MSE(its output before o_proj, the teacher's softmax output) and passes the teacher's output on."""

    modules: Mapping[int, nn.Module]
    mse: dict[int, torch.Tensor] = field(default_factory=dict)
    _targets: dict[int, torch.Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> AttentionTransfer:
        for idx, attn in self.modules.items():
            if not isinstance(attn, (BasedHybridAttention, BasedLinearAttention)):
                raise ConversionError(f"layer {idx} is a {type(attn).__name__}, not a converted attention layer")
            self._handles.append(attn.register_forward_pre_hook(self._teacher_hook(idx)))
            self._handles.append(attn.o_proj.register_forward_hook(self._compare_hook(idx)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._targets.clear()

    def _teacher_hook(self, idx):
        def hook(module, args):
            hidden_states, key_mask, position_embeddings = args[:3]
            with torch.no_grad():
                q, k, v = module.project(hidden_states, position_embeddings)
                self._targets[idx] = teacher_attention(q, k, v, key_mask)

        return hook

    def _compare_hook(self, idx):
        def hook(module, args, output):
            y_true = self._targets.pop(idx)
            self.mse[idx] = F.mse_loss(args[0].float(), y_true.float())
            return F.linear(y_true.to(args[0].dtype), module.weight, module.bias)  # the teacher's layer output

        return hook

    def loss(self, num_layers: int, factor: float) -> torch.Tensor:
        """sum of the recorded per-layer MSEs / num_layers * factor (LoLCATs: mean over layers x 1000); clears them.
        `num_layers` is the number of converted layers of the whole model, also when only a block runs."""
        if not self.mse:
            raise ConversionError("internal error: no attention-transfer loss was recorded")
        total = torch.stack(list(self.mse.values())).sum() / num_layers * factor
        self.mse = {}
        return total


@torch.no_grad()
def layer_attention_mse(
    model: BasedForCausalLM, input_ids: torch.Tensor, batch_size: int = 1, autocast=contextlib.nullcontext
) -> dict[int, float]:
    """{converted layer: its attention-transfer MSE (the stage-1 loss term, unscaled), mean over the batches of
    `input_ids`}, every layer on the teacher's hidden states; one forward per batch."""
    layers = converted_layers(model.config)
    device = next(model.parameters()).device
    modules = {i: model.model.layers[i].self_attn for i in layers}
    totals = dict.fromkeys(layers, 0.0)
    batches = input_ids.split(batch_size)
    for ids in batches:
        with AttentionTransfer(modules) as transfer, autocast():
            model.model(input_ids=ids.to(device), use_cache=False)
        for i in layers:
            totals[i] += float(transfer.mse[i])
    return {i: total / len(batches) for i, total in totals.items()}


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token at `temperature`, x T^2, averaged over tokens."""
    t = temperature
    student_logp = F.log_softmax(logits.float() / t, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(student_logp.flatten(0, 1), teacher_logp.flatten(0, 1), log_target=True, reduction="batchmean")
    return kl * t * t


def lora_config(recipe: Recipe, config: BasedConfig):
    """peft LoraConfig on the converted layers' q/k/v/o projections (LoLCATs: r 8, alpha 16, dropout 0)."""
    from peft import LoraConfig, TaskType

    layers = "|".join(map(str, converted_layers(config)))
    targets = "|".join(recipe.lora_targets)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=rf".*model\.layers\.({layers})\.self_attn\.({targets})",
    )
