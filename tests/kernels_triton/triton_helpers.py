"""Inputs shared by the Triton kernel tests: seeded tensors on the device the kernels run on."""

import os

import torch

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


class Rand:
    """Seeded fp32 inputs on DEVICE: randn for raw values, uniform in [0.1, 1.1) for features, states and window
    factors."""

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape):
        return torch.randn(*shape, generator=self.generator).to(DEVICE)

    def positive(self, *shape):
        return (torch.rand(*shape, generator=self.generator) + 0.1).to(DEVICE)


def left_padding_mask(length):
    """[2, T] bool: row 0 all real, row 1 only its last T // 2 keys (all padding if T = 1)."""
    mask = torch.ones(2, length, dtype=torch.bool, device=DEVICE)
    mask[1, : length - length // 2] = False
    return mask


def run_with_grads(op, inputs, grad_out, **kwargs):
    """op(*inputs, **kwargs) and the gradients of sum(o * grad_out) w.r.t. inputs; inputs copied with grads on."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = op(*inputs, **kwargs)
    o = out[0] if isinstance(out, tuple) else out
    return out, torch.autograd.grad(o, inputs, grad_out.to(o.dtype))
