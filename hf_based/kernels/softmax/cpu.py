"""Softmax attention through torch's `scaled_dot_product_attention`. On the CPU for every call: its fused kernel never
holds the [B, H, Tq, Tk] scores, which the reference keeps in two or three copies (some 16 GB for two 8192-token rows
of a converted SmolLM2, against the teacher's few hundred MB through the same kernel). On a GPU for plain causal
attention in 16 bits (no window, no key mask, the queries are all the keys), where its flash / cuDNN kernels beat the
Triton kernel (a prefill of 8192 tokens, 9 heads of 64, bf16, one H100: 0.21 against 0.39 ms a layer)."""

import torch
import torch.nn.functional as F

from hf_based.kernels._checks import accumulation_dtype, check_attention_inputs, check_window
from hf_based.kernels.softmax.reference import visible_keys


def plain_causal(q, k, v, window: int | None, key_mask: torch.Tensor | None) -> bool:
    """Whether a call is plain causal attention in 16 bits, which SDPA's is_causal computes (see the module)."""
    if (
        window is not None
        or key_mask is not None
        or not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k, v))
    ):
        return False  # the Triton op takes it (and raises the reference's errors on bad inputs)
    half = q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
    return half and q.shape[1] == k.shape[1]


def causal_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Plain causal attention (see `plain_causal`) through SDPA's is_causal, in the inputs' dtype. The kv heads are
    repeated as transformers' Llama does: SDPA's own GQA would rule out its cuDNN kernel."""
    group = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)


def softmax_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Same arguments and result as `reference.softmax_attention`."""
    check_attention_inputs(q, k, v, key_mask)
    if window is not None:
        check_window(window)
    return sdpa_over(q, k, v, visible_keys(q.shape[1], k.shape[1], window, key_mask, q.device), scale)


def sdpa_over(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float | None):
    """Softmax attention of [B, T, H, D] inputs over the keys `visible` marks ([Tq, Tk], or [B, 1, Tq, Tk]), in
    the accumulation dtype."""
    # A query without a visible key (a padded position) would come out NaN: it reads key 0, then is zeroed.
    seen = visible.any(-1, keepdim=True)
    visible = visible | (~seen & (torch.arange(k.shape[1], device=q.device) == 0))
    out_dtype, dtype = v.dtype, accumulation_dtype(q, k, v)
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (q, k, v))  # [B, H, T, D]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True) * seen
    return o.transpose(1, 2).to(out_dtype)
