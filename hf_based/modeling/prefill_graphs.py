"""Prefills captured in CUDA graphs (`BasedForCausalLM.enable_prefill_graphs`).

A small model's eager prefill is host-bound: the GPU waits while Python launches some fifty kernels a layer one by
one. A prefill into an empty cache reads nothing on the host, so it can be captured once per input shape and replayed:
the replay launches every kernel at once. The first prefill of a shape runs eagerly twice (a warm-up, then the
capture) and is then replayed; each replay's cache is copied out of the graph's buffers, so that the caches of earlier
prefills stay valid. Only inference on CUDA, into a new or empty dynamic cache (`generate()`'s default); anything else
runs eagerly.
"""

import copy
from collections.abc import Callable

import torch

from hf_based.modeling.cache import BasedCache, all_real
from hf_based.modeling.compat import CACHE_FIELD, output_cache


class PrefillGraphs:
    def __init__(self, model, max_shapes: int):
        if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
            raise ValueError(f"max_shapes must be an int >= 1 (input shapes captured), got {max_shapes!r}")
        if model.device.type != "cuda":
            raise ValueError(f"prefill graphs need a model on a CUDA device, got one on {model.device}")
        self.model, self.max_shapes = model, max_shapes
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, dict]] = {}

    def applies(self, input_ids, inputs_embeds, cache, attention_mask, position_ids, logits_to_keep) -> bool:
        """Whether this forward (one that computes no loss nor hidden states) is a prefill the graphs serve."""
        empty_cache = cache is None or (
            isinstance(cache, BasedCache) and cache.max_cache_len is None and not cache.is_initialized
        )
        return (
            input_ids is not None
            and inputs_embeds is None
            and input_ids.is_cuda
            and input_ids.shape[1] > 1
            and empty_cache
            and not torch.is_grad_enabled()
            and not self.model.training
            and not isinstance(attention_mask, dict)
            and isinstance(logits_to_keep, int)
            and not torch.cuda.is_current_stream_capturing()
            and (self._key(input_ids, attention_mask, position_ids, logits_to_keep) in self.graphs
                 or len(self.graphs) < self.max_shapes)
        )  # fmt: skip

    @staticmethod
    def _key(input_ids, attention_mask, position_ids, logits_to_keep) -> tuple:
        return (
            tuple(input_ids.shape),
            None if attention_mask is None or all_real(attention_mask) else tuple(attention_mask.shape),
            None if position_ids is None else tuple(position_ids.shape),
            logits_to_keep,
        )

    def __call__(self, input_ids, attention_mask, position_ids, cache, logits_to_keep):
        """The forward's output, from a replay (capturing this shape first if it is new)."""
        key = self._key(input_ids, attention_mask, position_ids, logits_to_keep)
        # A mask of ones goes as none: the eager forward would drop it (plain causal attention), which a capture
        # cannot decide, since it cannot read the mask; the warm-up and the capture then run the same kernels.
        attention_mask = None if key[1] is None else attention_mask
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if key not in self.graphs:
            self.graphs[key] = self._capture({name: t.clone() for name, t in inputs.items() if t is not None}, key[-1])
        graph, static, result = self.graphs[key]
        for name, tensor in static.items():
            tensor.copy_(inputs[name])
        graph.replay()
        captured = result["outputs"]
        target = cache if cache is not None else BasedCache(self.model.config)
        # Copies of the graph's cache tensors (and the layers' Python state), which the next replay overwrites.
        target.layers = copy_layers(output_cache(captured).layers)
        target.seen_tokens = output_cache(captured).seen_tokens
        target.read_flags()
        return type(captured)(logits=captured.logits.clone(), **{CACHE_FIELD: target})

    def _capture(self, static: dict, logits_to_keep: int):
        result = {}

        def prefill():
            result["outputs"] = self.model(
                **static, cache=BasedCache(self.model.config), use_cache=True, logits_to_keep=logits_to_keep
            )

        self.model.prefill_graphs = None  # the eager forward, here
        try:
            graph = capture(prefill, static["input_ids"].device)
        finally:
            self.model.prefill_graphs = self
        return graph, static, result


def capture(step: Callable[[], object], device: torch.device, pool=None) -> torch.cuda.CUDAGraph:
    """step() captured in a CUDA graph, after one eager run on a side stream (Triton compiles there), as
    torch.cuda.graphs recommends. pool: another graph's memory pool to share (graphs that never run at once)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph


def copy_layers(layers: list) -> list:
    """Copies of cache layers, their tensors cloned: each tensor once up front, which deepcopy then finds in its memo
    (its own copy of a tensor costs some 30 us of Python; a converted SmolLM2's cache holds ~450 of them)."""
    memo = {}
    for layer in layers:
        for value in vars(layer).values():
            items = (
                value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else (value,)
            )
            memo.update((id(x), x.clone()) for x in items if isinstance(x, torch.Tensor))
    return copy.deepcopy(layers, memo)
