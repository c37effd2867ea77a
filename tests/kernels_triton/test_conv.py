"""The Triton short convolution kernels (short_conv, short_conv_recurrent) against the references.

Under the Triton interpreter (see conftest.py) with fp32 inputs and blocks of 16 (time and channels), so that these
small problems span several blocks, the last ones ragged, and the backward splits time over several programs; the
references run on fp64 copies. With TRITON_INTERPRET=0 and a GPU, the same tests run the compiled kernels.
"""

import pytest
import torch
from triton_helpers import DEVICE

from hf_based.kernels.conv import triton as conv
from hf_based.kernels.conv.reference import short_conv as reference
from hf_based.kernels.conv.reference import short_conv_recurrent as reference_recurrent

B, C = 2, 40


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    for name in ("BLOCK_T", "BLOCK_C", "BWD_BLOCK_T", "BWD_BLOCK_C"):
        monkeypatch.setattr(conv, name, 16)
    monkeypatch.setattr(conv, "BWD_PROGRAMS", 12)  # 3 channel blocks x 2 sequences x 2 time splits


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def assert_close(actual, expected, name="", tol=1e-4):
    """Relative L2 error <= tol."""
    assert actual.shape == expected.shape, name
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    error = (actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)
    assert error <= tol, f"{name}: relative L2 error {error:.2e} > {tol}"


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 2, 17, 63, 130])
def test_matches_reference_with_state(length, kernel_size):
    # x is a strided view, the first half of a [B, T, 2C] projection, as in BaseConv
    projection = randn(B, length, 2 * C, seed=length)
    weight, bias = randn(C, kernel_size, seed=1), randn(C, seed=2)
    state = randn(B, kernel_size - 1, C, seed=3)
    ours = [t.clone().requires_grad_() for t in (projection, weight, bias, state)]
    ref = [t.double().requires_grad_() for t in (projection, weight, bias, state)]
    y, final = conv.short_conv(ours[0][..., :C], *ours[1:], output_final_state=True)
    y_ref, final_ref = reference(ref[0][..., :C], *ref[1:], output_final_state=True)
    assert y.dtype == final.dtype == torch.float32
    assert_close(y, y_ref.detach(), "y")
    assert final.shape == final_ref.shape
    if kernel_size > 1:
        assert_close(final, final_ref.detach(), "final state")
    dy, dfinal = randn(*y.shape, seed=4).double(), randn(*final.shape, seed=5).double()
    ((y * dy.float()).sum() + (final * dfinal.float()).sum()).backward()
    ((y_ref * dy).sum() + (final_ref * dfinal).sum()).backward()
    for name, a, e in zip(("dx", "dweight", "dbias", "dstate"), ours, ref):
        if e.grad.numel():
            assert_close(a.grad, e.grad, name)


def test_no_bias_no_state_half():
    """fp16 x: y in fp16, the final state in fp32 (the accumulation dtype); weight and x grads without bias / state."""
    x, weight = randn(B, 37, C, seed=6).half().requires_grad_(), randn(C, 3, seed=7).requires_grad_()
    x64, weight64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    y, final = conv.short_conv(x, weight, output_final_state=True)
    y_ref, final_ref = reference(x64, weight64, output_final_state=True)
    assert y.dtype == torch.float16 and final.dtype == torch.float32
    assert_close(y, y_ref.detach(), "y", tol=1e-3)
    assert_close(final, final_ref.detach(), "final state")
    dy = randn(*y.shape, seed=8).double()
    (y * dy.half()).sum().backward()
    (y_ref * dy).sum().backward()
    assert_close(x.grad, x64.grad, "dx", tol=1e-3)
    assert_close(weight.grad, weight64.grad, "dweight", tol=1e-3)
    assert conv.short_conv(x, weight)[1] is None


def test_decode_steps():
    """Prefill, then decode steps chained through the state, against the reference's recurrent form."""
    x, weight, bias = randn(B, 8, C, seed=9), randn(C, 4, seed=10), randn(C, seed=11)
    state = conv.short_conv(x[:, :5], weight, bias, output_final_state=True)[1]
    ref_state = reference(x[:, :5].double(), weight.double(), bias.double(), output_final_state=True)[1]
    for t in range(5, 8):
        y, state = conv.short_conv_recurrent(x[:, t : t + 1], weight, bias, state, output_final_state=True)
        y_ref, ref_state = reference_recurrent(
            x[:, t : t + 1].double(), weight.double(), bias.double(), ref_state, output_final_state=True
        )
        assert state.dtype == torch.float32
        assert_close(y, y_ref, f"y step {t}")
        assert_close(state, ref_state, f"state step {t}")


def bad_inputs():
    x, weight, bias, state = randn(B, 4, C), randn(C, 3), randn(C), randn(B, 2, C)
    return [
        ((x[0], weight), {}),
        ((x, weight[:4]), {}),
        ((x, weight[:, 0]), {}),
        ((x, weight, bias[:4]), {}),
        ((x, weight), {"initial_state": state[:, :1]}),
        ((x, weight), {"initial_state": state[0]}),
    ]


@pytest.mark.parametrize("case", range(len(bad_inputs())))
@pytest.mark.parametrize(
    "ours, ref",
    [(conv.short_conv, reference), (conv.short_conv_recurrent, reference_recurrent)],
    ids=["parallel", "recurrent"],
)
def test_bad_input_raises_reference_error(ours, ref, case):
    args, kwargs = bad_inputs()[case]
    with pytest.raises(ValueError) as expected:
        ref(*args, **kwargs)
    with pytest.raises(ValueError) as got:
        ours(*args, **kwargs)
    assert str(got.value) == str(expected.value)
