"""RMSNorm as transformers' Llama computes it: y = weight * round(x / sqrt(mean(x^2) + eps)), the normalisation in
fp32 whatever x's dtype (so a converted model normalises exactly as its teacher), rounded to x's dtype before the
weight multiplies it."""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., N], weight: [N] -> [..., N] in the promoted dtype of x and weight."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's residual add and the norm after it: (h, rms_norm(h)) with h = residual + x."""
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected x's {tuple(x.shape)}")
    h = residual + x
    return h, rms_norm(h, weight, eps)
