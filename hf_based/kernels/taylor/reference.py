"""BASED linear attention: causal normalised linear attention on the 2nd-order Taylor features of raw q and k."""

import torch

from hf_based.kernels._checks import accumulation_dtype, check_shape
from hf_based.kernels.feature_maps import taylor_feature_map
from hf_based.kernels.linear.reference import linear_attention, linear_attention_recurrent


def _taylor_features(q, k, v):
    """Raw q, k [B, T, H, d] -> Taylor features [B, T, H, 1 + d + d*d], mapped in the accumulation dtype."""
    check_shape("q", q, "batch, time, heads, dim")
    check_shape("k", k, "batch, time, heads, dim", (None, None, None, q.shape[-1]))
    dtype = accumulation_dtype(q, k, v)
    return taylor_feature_map(q.to(dtype)), taylor_feature_map(k.to(dtype))


def taylor_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """BASED linear attention: `linear_attention` on Taylor features of raw q, k [B, T, H, d]."""
    q, k = _taylor_features(q, k, v)
    return linear_attention(q, k, v, key_mask, initial_state, output_final_state, eps)


def taylor_linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Decode form of `taylor_linear_attention`."""
    q, k = _taylor_features(q, k, v)
    return linear_attention_recurrent(q, k, v, key_mask, initial_state, output_final_state, eps)
