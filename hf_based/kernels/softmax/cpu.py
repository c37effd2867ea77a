"""Softmax attention through torch's `scaled_dot_product_attention`: the CPU path. Its fused kernel never holds the
[B, H, Tq, Tk] scores, which the reference keeps in two or three copies (some 16 GB for two 8192-token rows of a
converted SmolLM2, against the teacher's few hundred MB through the same kernel)."""

import torch
import torch.nn.functional as F

from hf_based.kernels._checks import accumulation_dtype, check_attention_inputs, check_window
from hf_based.kernels.softmax.reference import visible_keys


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
    visible = visible_keys(q.shape[1], k.shape[1], window, key_mask, q.device)
    # A query without a visible key (a padded position) would come out NaN: it reads key 0, then is zeroed.
    seen = visible.any(-1, keepdim=True)
    visible = visible | (~seen & (torch.arange(k.shape[1], device=q.device) == 0))
    out_dtype, dtype = v.dtype, accumulation_dtype(q, k, v)
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (q, k, v))  # [B, H, T, D]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True) * seen
    return o.transpose(1, 2).to(out_dtype)
