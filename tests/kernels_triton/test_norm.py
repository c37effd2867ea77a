"""The Triton RMSNorm kernel against the reference (fp64 ground truth), under the interpreter on the CPU."""

import pytest
import torch
from triton_helpers import DEVICE

from hf_based.kernels.norm import triton as norm
from hf_based.kernels.norm.reference import add_rms_norm as add_reference
from hf_based.kernels.norm.reference import rms_norm as reference


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 63), (1, 300, 48), (3, 1, 576)])
def test_rms_norm_matches_reference(shape, dtype):
    x, weight = randn(*shape) * 3 + 1, randn(shape[-1], seed=1)
    expected = weight.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    y = norm.rms_norm(x.to(dtype), weight.to(dtype), 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert ((y.double() - expected).norm() / expected.norm()).item() < tol
    # In the input dtype it rounds where the reference rounds: equal to the reference run in that dtype.
    torch.testing.assert_close(y, reference(x.to(dtype), weight.to(dtype), 1e-5), atol=0, rtol=2e-3)


def test_rms_norm_with_gradients_runs_the_reference():
    x, weight = randn(2, 5, 16).requires_grad_(), randn(16, seed=1).requires_grad_()
    norm.rms_norm(x, weight, 1e-6).sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference(x_ref, w_ref, 1e-6).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0, rtol=0)
    torch.testing.assert_close(weight.grad, w_ref.grad, atol=0, rtol=0)


def test_rms_norm_refuses_a_weight_of_the_wrong_size():
    with pytest.raises(ValueError, match="weight"):
        norm.rms_norm(randn(2, 3, 8), randn(7), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 63), (1, 300, 48), (3, 1, 576)])
def test_add_rms_norm_matches_reference(shape, dtype):
    """The sum as the reference rounds it, and the norm of that sum."""
    x, residual, weight = randn(*shape) * 3 + 1, randn(*shape, seed=2) * 5, randn(shape[-1], seed=1)
    x, residual, weight = x.to(dtype), residual.to(dtype), weight.to(dtype)
    h, y = norm.add_rms_norm(x, residual, weight, 1e-5)
    h_ref, y_ref = add_reference(x, residual, weight, 1e-5)
    assert h.dtype == y.dtype == dtype and h.shape == y.shape == x.shape
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=2e-3)
    exact = residual.double() + x.double()
    expected = weight.double() * exact * torch.rsqrt(exact.pow(2).mean(-1, keepdim=True) + 1e-5)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert ((y.double() - expected).norm() / expected.norm()).item() < tol


def test_add_rms_norm_with_gradients_runs_the_reference():
    x, residual = randn(2, 5, 16).requires_grad_(), randn(2, 5, 16, seed=2).requires_grad_()
    weight = randn(16, seed=1).requires_grad_()
    h, y = norm.add_rms_norm(x, residual, weight, 1e-6)
    (h.sum() + y.sum()).backward()
    leaves = [t.detach().clone().requires_grad_() for t in (x, residual, weight)]
    h_ref, y_ref = add_reference(*leaves, 1e-6)
    (h_ref.sum() + y_ref.sum()).backward()
    for ours, ref in zip((x, residual, weight), leaves):
        torch.testing.assert_close(ours.grad, ref.grad, atol=0, rtol=0)


def test_add_rms_norm_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"residual has shape \(2, 3, 7\), expected x's \(2, 3, 8\)"):
        norm.add_rms_norm(randn(2, 3, 8), randn(2, 3, 7), randn(8), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        norm.add_rms_norm(randn(2, 3, 8), randn(2, 3, 8), randn(7), 1e-5)
