"""silu(gate) * up in one launch instead of two (an MLP's and a gated convolution's in every decode step). Forward
only: with gradients to compute, and while torch.compile traces (`use_forward_kernel`), the reference runs."""

import torch
import triton
import triton.language as tl

from hf_based.kernels.glu.reference import silu_mul as silu_mul_reference
from hf_based.kernels.triton_utils import cdiv, use_forward_kernel

BLOCK = 1024


@triton.jit
def silu_mul_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offsets, mask=mask, other=0.0)
    # rounded where the reference rounds: silu to the gate's dtype, then the product to the output's
    s = (g / (1 + tl.exp(-g))).to(G.dtype.element_ty)
    tl.store(Y + offsets, (s.to(tl.float32) * u.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton twin of the reference `silu_mul` (same arguments and result)."""
    if gate.shape != up.shape or not use_forward_kernel(gate, up):
        return silu_mul_reference(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    silu_mul_fwd_kernel[(cdiv(gate.numel(), BLOCK),)](gate, up, y, gate.numel(), BLOCK=BLOCK)
    return y
