"""Measured choice of the layers kept as softmax attention: `Recipe.softmax_layers = "STRATEGY:K"` or "STRATEGY:P%"
(P% of the model's layers, rounded down: the recipe's default, "copy:20%", keeps 6 of 30).

A converted model loses in-context recall; keeping a few full-softmax layers restores much of it, and which layers
matters (KL-guided layer selection, Jet-Nemotron, HALO). Both strategies score the untrained conversion with every
attention layer converted, on a few calibration sequences, and keep the K layers that score highest:

- kl (the default, "auto"): for each layer alone, put back full softmax attention (a `BasedAttention` holding that
  layer's own q/k/v/o modules, so nothing is copied) and measure how much this lowers the KL divergence of the
  model's next-token distribution from the teacher's. One teacher forward and one forward per layer.
- copy: for each layer alone, convert only that layer (the others stay softmax attention) and measure the KL from the
  teacher on text that repeats itself: each calibration sequence's first half followed by that half again, the KL
  counted on the repeat. The teacher predicts the repeat almost perfectly by copying from its context, so this ranks
  the layers that its in-context recall (induction and retrieval heads) depends on, which the KL on ordinary text
  can miss. One teacher forward and one forward per layer.
- mse: each layer's attention-transfer error, the stage-1 MSE between its output and the teacher's softmax attention
  on the teacher's hidden states (`AttentionTransfer`). One forward.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hf_based.conversion.linearize import (
    converted_layers,
    distillation_loss,
    layer_attention_mse,
    linearize_model,
)
from hf_based.conversion.recipe import SOFTMAX_LAYERS_FORMS, Recipe, parse_layer_selection
from hf_based.errors import ConversionError
from hf_based.modeling import BasedConfig, BasedForCausalLM
from hf_based.modeling.modeling_based import BasedAttention, BasedDecoderLayer
from hf_based.progress import progress_bar
from hf_based.training import autocast_for

logger = logging.getLogger(__name__)

CALIBRATION_SEQUENCES = 8  # the first packed training sequences
CRITERIA = {
    "kl": "restoring the layer alone to softmax attention lowers the KL divergence from the teacher's next-token "
    "distribution most (score: that reduction)",
    "copy": "converting the layer alone raises the KL divergence from the teacher's next-token distribution most on "
    "text that repeats itself, counted on the repeat (score: that KL)",
    "mse": "the layer's attention-transfer error is largest (score: the MSE between its output and the teacher's "
    "softmax attention output)",
}


@dataclass
class LayerSelection:
    """What a selection spec chose: the softmax layers, and every converted layer's score (higher: keep softmax);
    `k`, the number of layers the spec asks for in this model (for "STRATEGY:P%", P% of its layers rounded down)."""

    spec: str
    strategy: str
    layers: list[int]
    scores: dict[int, float]
    calibration_sequences: int
    num_layers: int | None = None  # the model's layers
    k: int | None = None

    def __post_init__(self):
        if self.k is None:  # a selection recorded before K was: it kept K layers
            self.k = len(self.layers)


def check_selection_size(recipe: Recipe, num_layers: int) -> tuple[str, int]:
    """(strategy, K) of the recipe's selection spec for a model of `num_layers` layers, "STRATEGY:P%" resolved to
    K = floor(P / 100 x num_layers); ConversionError when K exceeds the model's layers."""
    spec = parse_layer_selection(recipe.softmax_layers)
    k = spec.size(num_layers)
    if k > num_layers:
        raise ConversionError(
            f"softmax_layers={recipe.softmax_layers!r} asks for {k} layers of a model of {num_layers}; "
            f"accepted: {SOFTMAX_LAYERS_FORMS}, K <= {num_layers}"
        )
    return spec.strategy, k


@contextlib.contextmanager
def full_attention(layer: BasedDecoderLayer, config: BasedConfig) -> Iterator[None]:
    """While active, `layer`'s mixer is full softmax attention over the same q/k/v/o modules."""
    converted = layer.self_attn
    with torch.device("meta"):
        restored = BasedAttention(config, converted.layer_idx, window=None)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(restored, name, getattr(converted, name))
    layer.self_attn = restored
    try:
        yield
    finally:
        layer.self_attn = converted


def _kl_to_teacher(student: BasedForCausalLM, ids: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    return float(distillation_loss(student(input_ids=ids, use_cache=False).logits, teacher_logits, temperature=1.0))


def repeated_halves(ids: torch.Tensor) -> torch.Tensor:
    """[N, T] -> [N, 2 * (T // 2)]: each sequence's first half, then that half again."""
    half = ids[:, : ids.shape[1] // 2]
    return torch.cat([half, half], dim=1)


@contextlib.contextmanager
def only_converted(student: BasedForCausalLM, layer: int) -> Iterator[None]:
    """While active, every converted layer of `student` but `layer` is full softmax attention again."""
    with contextlib.ExitStack() as stack:
        for i in converted_layers(student.config):
            if i != layer:
                stack.enter_context(full_attention(student.model.layers[i], student.config))
        yield


@torch.no_grad()
def kl_scores(
    teacher: nn.Module,
    student: BasedForCausalLM,
    calibration_ids: torch.Tensor,
    batch_size: int = 1,
    autocast=contextlib.nullcontext,
    progress: bool = True,
) -> dict[int, float]:
    """{converted layer: KL(teacher || student) with every layer converted - the same with this one restored to
    softmax attention}, per token, mean over the batches of `calibration_ids`."""

    layers = converted_layers(student.config)
    device = next(student.parameters()).device
    reduction = dict.fromkeys(layers, 0.0)
    batches = calibration_ids.split(batch_size)
    # Batch by batch, so that only one batch's vocabulary-sized logits are held at a time.
    for ids in progress_bar(batches, desc="layer selection (kl)", disable=not progress):
        ids = ids.to(device)
        with autocast():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            converted_kl = _kl_to_teacher(student, ids, teacher_logits)
            for i in layers:
                with full_attention(student.model.layers[i], student.config):
                    reduction[i] += converted_kl - _kl_to_teacher(student, ids, teacher_logits)
    return {i: total / len(batches) for i, total in reduction.items()}


@torch.no_grad()
def copy_scores(
    teacher: nn.Module,
    student: BasedForCausalLM,
    calibration_ids: torch.Tensor,
    batch_size: int = 1,
    autocast=contextlib.nullcontext,
    progress: bool = True,
) -> dict[int, float]:
    """{converted layer: KL(teacher || student with only this layer converted)}, per token of the repeat in
    `repeated_halves` of the calibration sequences, mean over the batches.

    The layers below the converted one are the teacher's, so each measurement starts from the teacher's hidden
    states at that layer and runs only the layers above it, and the logits only of the repeat: about half the work
    of full forwards."""

    layers = converted_layers(student.config)
    device = next(student.parameters()).device
    ids_all = repeated_halves(calibration_ids)
    start = ids_all.shape[1] // 2
    positions = torch.arange(ids_all.shape[1], device=device)[None]
    scores = dict.fromkeys(layers, 0.0)
    batches = ids_all.split(batch_size)
    for ids in progress_bar(batches, desc="layer selection (copy)", disable=not progress):
        ids = ids.to(device)
        with autocast():
            teacher_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=True)
            teacher_logits = teacher_out.logits[:, start:]
            layer_inputs = teacher_out.hidden_states  # [i]: the input of layer i
            position_embeddings = student.model.rotary_emb(layer_inputs[0], positions)
            for i in layers:
                hidden = layer_inputs[i]
                with only_converted(student, i):
                    for layer in student.model.layers[i:]:
                        hidden = layer(hidden, position_embeddings=position_embeddings)
                logits = student.lm_head(student.model.norm(hidden[:, start:]))
                scores[i] += float(distillation_loss(logits, teacher_logits, temperature=1.0))
    return {i: total / len(batches) for i, total in scores.items()}


def top_layers(scores: dict[int, float], k: int) -> list[int]:
    """The k layers with the highest scores (ties: the lower index), in layer order."""
    return sorted(sorted(scores, key=lambda i: (-scores[i], i))[:k])


def select_softmax_layers(
    teacher: nn.Module,
    recipe: Recipe,
    calibration_ids: torch.Tensor,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> LayerSelection:
    """The K layers that `recipe.softmax_layers` ("kl:K", "copy:K", "mse:K", "auto:K" = "kl:K", or with P% for K:
    P% of the teacher's layers, rounded down) keeps as softmax attention, measured on `calibration_ids` [N, T] in
    batches of `recipe.batch_size`; deterministic for the same inputs. Nothing is measured when K is 0.
    The teacher returns to the device it came from."""
    num_layers = teacher.config.num_hidden_layers
    strategy, k = check_selection_size(recipe, num_layers)
    if k == 0:
        return LayerSelection(recipe.softmax_layers, strategy, [], {}, 0, num_layers, 0)
    device = torch.device(device)
    autocast = autocast_for(device, recipe.precision)
    student = linearize_model(teacher, recipe.selection_probe(), device=device)
    if strategy in ("kl", "copy"):
        home = next(teacher.parameters()).device
        teacher.to(device)
        score = kl_scores if strategy == "kl" else copy_scores
        scores = score(teacher, student, calibration_ids, recipe.batch_size, autocast, progress)
        teacher.to(home)
    else:
        scores = layer_attention_mse(student, calibration_ids, recipe.batch_size, autocast)
    layers = top_layers(scores, k)
    logger.info(
        "softmax layers %s (%s, %d of %d: %s): %s",
        layers,
        recipe.softmax_layers,
        k,
        num_layers,
        CRITERIA[strategy],
        ", ".join(f"{i}: {score:.4g}" for i, score in scores.items()),
    )
    return LayerSelection(recipe.softmax_layers, strategy, layers, scores, len(calibration_ids), num_layers, k)
