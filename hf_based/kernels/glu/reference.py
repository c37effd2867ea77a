"""SwiGLU's gating, silu(gate) * up, as PyTorch computes it: silu rounded to the inputs' dtype, then the product."""

import torch
from torch.nn import functional as F


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., N] of one shape -> silu(gate) * up."""
    if gate.shape != up.shape:
        raise ValueError(f"up has shape {tuple(up.shape)}, expected gate's {tuple(gate.shape)}")
    return F.silu(gate) * up
