"""Causal softmax attention, full or sliding-window, with GQA and cached prefix keys.

The Tq queries are the last Tq of the Tk key positions (flash-attn's kv-cache convention): query i sits at key
position p = Tk - Tq + i and sees key j iff p - window < j <= p and key_mask_j.
"""

import torch

from hf_based.kernels._checks import accumulation_dtype, check_attention_inputs, check_window


def key_distance(q_len: int, k_len: int, device) -> torch.Tensor:
    """[Tq, Tk] p - j: how far key j lies behind query i (at key position p = Tk - Tq + i); < 0 = in the future."""
    return torch.arange(k_len - q_len, k_len, device=device)[:, None] - torch.arange(k_len, device=device)


def visible_keys(q_len: int, k_len: int, window: int | None, key_mask: torch.Tensor | None, device) -> torch.Tensor:
    """[Tq, Tk] bool, or [B, 1, Tq, Tk] with a key_mask [B, Tk]: which keys each query sees."""
    distance = key_distance(q_len, k_len, device)
    visible = distance >= 0 if window is None else (distance >= 0) & (distance < window)
    return visible if key_mask is None else visible & key_mask.bool()[:, None, None, :]


def stable_exp(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """exp(s - c) with c the max visible score of each row; 0 where not visible, so all 0 (not NaN) in a row
    without visible keys."""
    scores = scores.masked_fill(~visible, float("-inf"))
    c = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)  # finite even for an empty row
    return torch.exp(scores - c)


def normalise(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den[..., None]; a row without any visible key (num = den = 0) gets 0, and finite gradients: dividing by 1
    there rather than by a tiny clamp keeps d num from overflowing into inf * 0 = NaN."""
    return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q: [B, Tq, H, D]; k: [B, Tk, Hkv, D]; v: [B, Tk, Hkv, Dv], Tk >= Tq, query head h uses kv head h // (H // Hkv).

    window: keys a query sees, itself included (None = all earlier keys); key_mask: [B, Tk], 0 = padding.
    Returns o [B, Tq, H, Dv] in v.dtype; a query without visible keys gets 0.
    """
    check_attention_inputs(q, k, v, key_mask)
    if window is not None:
        check_window(window)
    out_dtype = v.dtype
    dtype = accumulation_dtype(q, k, v)
    group = q.shape[2] // k.shape[2]
    q, k, v = q.to(dtype), k.to(dtype).repeat_interleave(group, 2), v.to(dtype).repeat_interleave(group, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    visible = visible_keys(q.shape[1], k.shape[1], window, key_mask, q.device)
    p = stable_exp(torch.einsum("bihd,bjhd->bhij", q, k) * scale, visible)  # [B, H, Tq, Tk]
    return normalise(torch.einsum("bhij,bjhd->bihd", p, v), p.sum(-1).transpose(1, 2)).to(out_dtype)
