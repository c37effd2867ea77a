"""LoLCATs' learned hedgehog feature map (Zhang et al. 2024): phi(x) = [softmax(xW), softmax(-xW)], one W per head."""

import torch

from hf_based.kernels._checks import accumulation_dtype, check_shape


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
