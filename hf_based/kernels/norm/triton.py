"""RMSNorm in one kernel, one program per row: the reference's six or more elementwise and reduction kernels become
one launch, which is what a decode step's many small norms cost; `add_rms_norm` folds a residual add into the same
launch. Forward only: with gradients to compute, and while torch.compile traces (`use_forward_kernel`), the reference
runs."""

import torch
import triton
import triton.language as tl

from hf_based.kernels._checks import check_shape
from hf_based.kernels.norm.reference import add_rms_norm as add_rms_norm_reference
from hf_based.kernels.norm.reference import rms_norm as rms_norm_reference
from hf_based.kernels.triton_utils import next_power_of_2, use_forward_kernel


@triton.jit
def _normalize_row(h, W, Y, row, cols, N, eps, X_DTYPE: tl.constexpr):
    """Y[row] = W * round(h / sqrt(mean(h^2) + eps)) for the row h [BN] (fp32), rounded to X_DTYPE as the reference."""
    y = (h * tl.rsqrt(tl.sum(h * h, 0) / N + eps)).to(X_DTYPE)
    w = tl.load(W + cols, mask=cols < N, other=0.0)
    tl.store(Y + row * N + cols, (w.to(tl.float32) * y.to(tl.float32)).to(Y.dtype.element_ty), mask=cols < N)


@triton.jit
def rms_norm_fwd_kernel(X, W, Y, N, eps, BN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BN)
    x = tl.load(X + row * N + cols, mask=cols < N, other=0.0)
    _normalize_row(x.to(tl.float32), W, Y, row, cols, N, eps, X.dtype.element_ty)


@triton.jit
def add_rms_norm_fwd_kernel(X, R, W, H, Y, N, eps, BN: tl.constexpr):
    """H = R + X, rounded to H's dtype as the reference's add is, then Y = rms_norm(H)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BN)
    x = tl.load(X + row * N + cols, mask=cols < N, other=0.0)
    r = tl.load(R + row * N + cols, mask=cols < N, other=0.0)
    h = (r.to(tl.float32) + x.to(tl.float32)).to(H.dtype.element_ty)
    tl.store(H + row * N + cols, h, mask=cols < N)
    _normalize_row(h.to(tl.float32), W, Y, row, cols, N, eps, H.dtype.element_ty)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton twin of the reference `rms_norm` (same arguments and result)."""
    check_shape("weight", weight, "features", (x.shape[-1],))
    if not use_forward_kernel(x, weight):
        return rms_norm_reference(x, weight, eps)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = next_power_of_2(x2.shape[1])
    rms_norm_fwd_kernel[(x2.shape[0],)](x2, weight.contiguous(), y, x2.shape[1], eps, BN=block)
    return y.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Triton twin of the reference `add_rms_norm` (same arguments and result): one launch for both."""
    check_shape("weight", weight, "features", (x.shape[-1],))
    if residual.shape != x.shape or not use_forward_kernel(x, residual, weight):
        return add_rms_norm_reference(x, residual, weight, eps)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    h = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    y = torch.empty(x2.shape, dtype=torch.promote_types(h.dtype, weight.dtype), device=x.device)
    add_rms_norm_fwd_kernel[(x2.shape[0],)](
        x2, residual.reshape(x2.shape).contiguous(), weight.contiguous(), h, y, x2.shape[1], eps,
        BN=next_power_of_2(x2.shape[1]),
    )
    return h.view(x.shape), y.view(x.shape)
