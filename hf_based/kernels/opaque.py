"""The decode-step ops as torch custom ops, for torch.compile.

transformers compiles the decoding step of a static-cache `generate()`. Inside a compiled region, `dispatched` calls
these instead of the ops themselves: each op is then one opaque call in the graph (its Triton launches, shape checks
and Python branches are not traced), with a fake implementation that gives the output shapes. At run time the custom
op calls the ordinary dispatch, so the compiled step runs the same kernels as the eager one. Inference only: the
custom ops have no backward.

Each custom op returns every tensor it makes (states included, which the compiled step always keeps); the wrapper
puts them back in the op's own return structure.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from hf_based.kernels._checks import accumulation_dtype
from hf_based.kernels.feature_maps import taylor_num_features


def _attention_output(q: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype)


def _linear_states(q: Tensor, v: Tensor, features: int, *inputs: Tensor) -> tuple[Tensor, Tensor]:
    """kv [B, H, F, Dv], z [B, H, F] in the accumulation dtype of `inputs`."""
    batch, heads, dtype = q.shape[0], q.shape[2], accumulation_dtype(*inputs)
    return q.new_empty(batch, heads, features, v.shape[-1], dtype=dtype), q.new_empty(
        batch, heads, features, dtype=dtype
    )


def _contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    """What the fakes promise: contiguous outputs (a kernel may return a view, e.g. the last K-1 rows of a window)."""
    return tuple(t.contiguous() for t in tensors)


def _states(initial_state: tuple[Tensor, ...] | None) -> tuple[Tensor | None, Tensor | None]:
    return initial_state if initial_state is not None else (None, None)


def _pair(kv: Tensor | None, z: Tensor | None) -> tuple[Tensor, Tensor] | None:
    return None if kv is None else (kv, z)


def opaque_softmax_attention(run: Callable) -> Callable:
    @torch.library.custom_op("hf_based::softmax_attention", mutates_args=())
    def op(q: Tensor, k: Tensor, v: Tensor, window: int | None, key_mask: Tensor | None, scale: float | None) -> Tensor:
        return run(q, k, v, window=window, key_mask=key_mask, scale=scale).contiguous()

    op.register_fake(lambda q, k, v, window, key_mask, scale: _attention_output(q, v))

    def call(q, k, v, window=None, key_mask=None, scale=None):
        return op(q, k, v, window, key_mask, scale)

    return call


def opaque_linear_attention_recurrent(name: str, run: Callable, taylor: bool) -> Callable:
    """Linear attention's decode op; `taylor`: q/k are raw (BASED), else already features."""

    @torch.library.custom_op(f"hf_based::{name}", mutates_args=())
    def op(
        q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, kv: Tensor | None, z: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        o, (kv, z) = run(q, k, v, key_mask, _pair(kv, z), True, eps)
        return _contiguous(o, kv, z)

    @op.register_fake
    def _(q, k, v, key_mask, kv, z, eps):
        features = taylor_num_features(q.shape[-1]) if taylor else q.shape[-1]
        return _attention_output(q, v), *_linear_states(q, v, features, q, k, v)

    def call(q, k, v, key_mask=None, initial_state=None, output_final_state=False, eps=1e-12):
        o, kv, z = op(q, k, v, key_mask, *_states(initial_state), eps)
        return o, ((kv, z) if output_final_state else None)

    return call


def opaque_hybrid_attention_recurrent(run: Callable) -> Callable:
    @torch.library.custom_op("hf_based::hybrid_attention_recurrent", mutates_args=())
    def op(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_feat: Tensor,
        k_feat: Tensor,
        window_factor: Tensor,
        window: int,
        key_mask: Tensor | None,
        kv: Tensor | None,
        z: Tensor | None,
        scale: float | None,
        sink_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        o, (kv, z) = run(q, k, v, q_feat, k_feat, window_factor, window, key_mask, _pair(kv, z), True, scale, sink_mask)
        return _contiguous(o, kv, z)

    @op.register_fake
    def _(q, k, v, q_feat, k_feat, window_factor, window, key_mask, kv, z, scale, sink_mask):
        return _attention_output(q, v), *_linear_states(q, v, q_feat.shape[-1], q, k, v, q_feat, k_feat)

    def call(
        q,
        k,
        v,
        q_feat,
        k_feat,
        window_factor,
        window,
        key_mask=None,
        initial_state=None,
        output_final_state=False,
        scale=None,
        sink_mask=None,
    ):
        o, kv, z = op(
            q, k, v, q_feat, k_feat, window_factor, window, key_mask, *_states(initial_state), scale, sink_mask
        )
        return o, ((kv, z) if output_final_state else None)

    return call


def opaque_short_conv_recurrent(run: Callable) -> Callable:
    @torch.library.custom_op("hf_based::short_conv_recurrent", mutates_args=())
    def op(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
        return _contiguous(*run(x, weight, bias, initial_state, True))

    @op.register_fake
    def _(x, weight, bias, initial_state):
        state = x.new_empty(x.shape[0], weight.shape[1] - 1, x.shape[2], dtype=accumulation_dtype(x, weight))
        return torch.empty_like(x), state

    def call(x, weight, bias=None, initial_state=None, output_final_state=False):
        y, state = op(x, weight, bias, initial_state)
        return y, (state if output_final_state else None)

    return call
