"""RMSNorm in one kernel, one program per row: the reference's six or more elementwise and reduction kernels become
one launch, which is what a decode step's many small norms cost. Forward only: with gradients to compute, and while
torch.compile traces (`use_forward_kernel`), the reference runs."""

import torch
import triton
import triton.language as tl

from hf_based.kernels._checks import check_shape
from hf_based.kernels.norm.reference import rms_norm as rms_norm_reference
from hf_based.kernels.triton_utils import next_power_of_2, use_forward_kernel


@triton.jit
def rms_norm_fwd_kernel(X, W, Y, N, eps, BN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BN)
    x = tl.load(X + row * N + cols, mask=cols < N, other=0.0)
    h = x.to(tl.float32)
    y = (h * tl.rsqrt(tl.sum(h * h, 0) / N + eps)).to(X.dtype.element_ty)  # rounded to x's dtype, as the reference
    w = tl.load(W + cols, mask=cols < N, other=0.0)
    tl.store(Y + row * N + cols, (w.to(tl.float32) * y.to(tl.float32)).to(Y.dtype.element_ty), mask=cols < N)


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
