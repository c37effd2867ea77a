"""The Triton RoPE kernel against the reference (fp64 ground truth), under the interpreter on the CPU."""

import pytest
import torch
from triton_helpers import Rand

from hf_based.kernels.rope import triton as rope
from hf_based.kernels.rope.reference import apply_rotary as reference


def angles(rand, batch, length, dim):
    """cos/sin [batch, T, dim] of random positions, as the rotary embedding makes them (two equal halves)."""
    freqs = rand.normal(batch, length, dim // 2) * 40
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch, length, heads, kv_heads, dim, angle_batch",
    [(1, 1, 1, 1, 2, 1), (2, 7, 9, 3, 64, 2), (1, 63, 4, 4, 48, 1), (2, 300, 3, 1, 32, 1)],
)
def test_rope_matches_reference(batch, length, heads, kv_heads, dim, angle_batch, dtype):
    rand = Rand(length)
    # q as the projection leaves it: a view of [B, T, H * D]; k not contiguous along time
    q = rand.normal(batch, length, heads * dim).view(batch, length, heads, dim)
    k = rand.normal(batch, 2 * length, kv_heads, dim)[:, ::2]
    cos, sin = angles(rand, angle_batch, length, dim)
    q_out, k_out = rope.apply_rotary(*(x.to(dtype) for x in (q, k, cos, sin)))
    for out, truth in zip((q_out, k_out), reference(*(x.double() for x in (q, k, cos, sin)))):
        assert out.dtype == dtype and out.shape == truth.shape
        tol = 1e-6 if dtype == torch.float32 else 2e-3
        assert ((out.double() - truth).norm() / truth.norm()).item() < tol
    # Rounded where the reference's ops round: in fp16, within one rounding of the reference run in fp16 (the same
    # bits under the interpreter; compiled code may fuse a product into the sum).
    for out, expected in zip((q_out, k_out), reference(*(x.to(dtype) for x in (q, k, cos, sin)))):
        fp16 = dtype == torch.float16
        torch.testing.assert_close(out, expected, atol=1e-3 if fp16 else 1e-6, rtol=2**-10 if fp16 else 0)


def test_rope_with_gradients_runs_the_reference():
    rand = Rand(1)
    q, k = rand.normal(1, 5, 2, 8).requires_grad_(), rand.normal(1, 5, 1, 8).requires_grad_()
    cos, sin = angles(rand, 1, 5, 8)
    sum(x.sum() for x in rope.apply_rotary(q, k, cos, sin)).backward()
    q_ref, k_ref = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    sum(x.sum() for x in reference(q_ref, k_ref, cos, sin)).backward()
    torch.testing.assert_close(q.grad, q_ref.grad, atol=0, rtol=0)
    torch.testing.assert_close(k.grad, k_ref.grad, atol=0, rtol=0)


def test_rope_refuses_angles_of_the_wrong_length():
    rand = Rand(2)
    cos, sin = angles(rand, 1, 4, 8)
    with pytest.raises(ValueError, match="cos must have shape"):
        rope.apply_rotary(rand.normal(1, 5, 2, 8), rand.normal(1, 5, 1, 8), cos, sin)
