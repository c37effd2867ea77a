"""Feature maps phi for linear attention: phi(q).phi(k) stands in for exp(q.k / sqrt(d))."""

import math

import torch

from hf_based.kernels._checks import accumulation_dtype, check_shape


def taylor_num_features(d: int) -> int:
    """How many features `taylor_feature_map` makes of d input dims."""
    return 1 + d + d * d


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """BASED's 2nd-order Taylor map: [..., d] -> [..., 1 + d + d*d], such that phi(q).phi(k) = 1 + s + s^2/2 with
    s = q.k / sqrt(d) (Arora et al. 2024). Elementwise products only, so it runs in x's dtype."""
    d = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * d)  # [..., d*d]
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, x2], dim=-1)


def hedgehog_feature_map(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LoLCATs' learned map [softmax(xW), softmax(-xW)] with one W per head.

    x: [B, T, H, D], weight: [H, D, F] -> [B, T, H, 2F] in x.dtype (computed in fp32 or fp64).
    """
    _, _, heads, dim = check_shape("x", x, "batch, time, heads, dim")
    check_shape("weight", weight, "heads, dim, feature_dim", (heads, dim, None))
    dtype = accumulation_dtype(x, weight)
    u = torch.einsum("bthd,hdf->bthf", x.to(dtype), weight.to(dtype))  # [B, T, H, F]
    # LoLCATs clamps so that no feature is exactly 0 after softmax underflow.
    return torch.cat([u.softmax(-1), (-u).softmax(-1)], dim=-1).clamp(min=1e-12).to(x.dtype)
