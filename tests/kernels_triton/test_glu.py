"""The Triton silu(gate) * up kernel against the reference (fp64 ground truth), under the interpreter on the CPU."""

import pytest
import torch
from torch.nn import functional as F
from triton_helpers import DEVICE

from hf_based.kernels.glu import triton as glu
from hf_based.kernels.glu.reference import silu_mul as reference


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 63), (1, 300, 48), (3, 1, 2051)])
def test_silu_mul_matches_reference(shape, dtype):
    gate, up = randn(*shape) * 4, randn(*shape, seed=1)
    y = glu.silu_mul(gate.to(dtype), up.to(dtype))
    assert y.shape == gate.shape and y.dtype == dtype
    exact = F.silu(gate.double()) * up.double()
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert ((y.double() - exact).norm() / exact.norm()).item() < tol
    torch.testing.assert_close(y, reference(gate.to(dtype), up.to(dtype)), atol=1e-6, rtol=2e-3)


def test_silu_mul_with_gradients_runs_the_reference():
    gate, up = randn(2, 5, 16).requires_grad_(), randn(2, 5, 16, seed=1).requires_grad_()
    glu.silu_mul(gate, up).sum().backward()
    leaves = [t.detach().clone().requires_grad_() for t in (gate, up)]
    reference(*leaves).sum().backward()
    for ours, ref in zip((gate, up), leaves):
        torch.testing.assert_close(ours.grad, ref.grad, atol=0, rtol=0)


def test_silu_mul_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"up has shape \(2, 3, 7\), expected gate's \(2, 3, 8\)"):
        glu.silu_mul(randn(2, 3, 8), randn(2, 3, 7))
