"""The Triton hedgehog feature map against the reference (fp64 ground truth), under the interpreter on the CPU."""

import pytest
import torch
from triton_helpers import DEVICE

from hf_based.kernels.hedgehog import triton as hedgehog
from hf_based.kernels.hedgehog.reference import hedgehog_feature_map as reference


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("length", [1, 7, 63, 300])
@pytest.mark.parametrize("dim, features", [(64, 64), (16, 24)])
def test_hedgehog_matches_reference(length, dim, features, dtype):
    x, weight = randn(2, length, 3, dim), randn(3, dim, features, seed=1) / dim**0.5
    expected = reference(x.double(), weight.double())
    phi = hedgehog.hedgehog_feature_map(x.to(dtype), weight.to(dtype))
    assert phi.shape == (2, length, 3, 2 * features) and phi.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert ((phi.double() - expected).norm() / expected.norm()).item() < tol


def test_hedgehog_on_a_strided_input_and_the_clamp():
    """A query slice of a wider tensor (non-contiguous rows), and logits so large that softmax underflows: every
    feature stays >= 1e-12, as LoLCATs clamps."""
    wide = randn(1, 5, 2, 32)[..., :16] * 1e4
    weight = torch.eye(16, 8, device=DEVICE).expand(2, 16, 8).contiguous()
    phi = hedgehog.hedgehog_feature_map(wide, weight)
    torch.testing.assert_close(phi, reference(wide, weight), atol=1e-6, rtol=1e-5)
    assert phi.min().item() == pytest.approx(1e-12)


def test_hedgehog_with_gradients_runs_the_reference():
    x, weight = randn(1, 4, 2, 16).requires_grad_(), randn(2, 16, 8, seed=1).requires_grad_()
    hedgehog.hedgehog_feature_map(x, weight).square().sum().backward()
    assert x.grad is not None and weight.grad is not None and x.grad.abs().sum() > 0
