"""The Triton linear attention kernels (linear_attention, linear_attention_recurrent) against the references.

Under the Triton interpreter (see conftest.py) with fp32 inputs, chunks of 16 and feature / value blocks of 16, so
that these small problems span several chunks (the last one ragged) and several blocks; the references run on fp64
copies. With TRITON_INTERPRET=0 and a GPU, the same tests run the compiled kernels.
"""

import pytest
import torch
from triton_helpers import DEVICE, Rand, left_padding_mask

from hf_based.kernels.linear import triton as linear
from hf_based.kernels.linear.reference import linear_attention as reference
from hf_based.kernels.linear.reference import linear_attention_recurrent as reference_recurrent

B, H = 2, 2


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(linear, "BLOCK_K", 16)
    monkeypatch.setattr(linear, "BLOCK_V", 16)
    monkeypatch.setattr(linear, "SCAN_BLOCK_U", 4)  # several steps of the scan over the up to 9 chunks


def assert_close(actual, expected, name="", tol=1e-4):
    """Relative L2 error <= tol."""
    assert actual.shape == expected.shape, name
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    error = (actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)
    assert error <= tol, f"{name}: relative L2 error {error:.2e} > {tol}"


def leaves(*tensors):
    """Leaf copies (requiring grad) of fp32 inputs and of their fp64 twins for the reference."""
    ours = [t.clone().requires_grad_() for t in tensors]
    ref = [t.double().requires_grad_() for t in tensors]
    return ours, ref


def backward(outputs, ref_outputs, seed=1):
    """Backpropagate the same random cotangents through both results."""
    rand = Rand(seed)
    cotangents = [rand.normal(*o.shape).double() for o in ref_outputs]
    sum((o * c.to(o.dtype)).sum() for o, c in zip(outputs, cotangents)).backward()
    sum((o * c).sum() for o, c in zip(ref_outputs, cotangents)).backward()


@pytest.mark.parametrize("features, value_dim", [(16, 32), (32, 16)])
@pytest.mark.parametrize("length", [1, 17, 63, 130])
def test_matches_reference_with_state_and_padding(length, features, value_dim):
    rand = Rand(length)
    q, k = rand.positive(B, length, H, features), rand.positive(B, length, H, features)
    v = rand.normal(B, length, H, value_dim)
    kv0, z0 = rand.positive(B, H, features, value_dim), rand.positive(B, H, features)
    mask = left_padding_mask(length)
    ours, ref = leaves(q, k, v, kv0, z0)
    o, (kv, z) = linear.linear_attention(
        *ours[:3], key_mask=mask, initial_state=tuple(ours[3:]), output_final_state=True, chunk_size=16
    )
    o_ref, (kv_ref, z_ref) = reference(
        *ref[:3], key_mask=mask, initial_state=tuple(ref[3:]), output_final_state=True, chunk_size=16
    )
    assert o.dtype == kv.dtype == z.dtype == torch.float32
    for name, a, e in (("o", o, o_ref), ("kv", kv, kv_ref), ("z", z, z_ref)):
        assert_close(a, e.detach(), name)
    backward((o, kv, z), (o_ref, kv_ref, z_ref))
    for name, a, e in zip(("dq", "dk", "dv", "dkv0", "dz0"), ours, ref):
        assert_close(a.grad, e.grad, name)


def test_strided_inputs_and_ragged_blocks():
    """Inputs read through views (q: half of the features, k: [B, H, T, F] transposed, v: every other head);
    F = 24 and Dv = 20 leave ragged feature / value blocks."""
    rand = Rand(1)
    length, features, value_dim = 40, 24, 20
    ours, ref = leaves(
        rand.positive(B, length, H, 2 * features),
        rand.positive(B, H, length, features),
        rand.normal(B, length, 2 * H, value_dim),
    )

    def views(q, k, v):
        return q[..., :features], k.transpose(1, 2), v[:, :, ::2]

    o, state = linear.linear_attention(*views(*ours), chunk_size=16)
    o_ref, _ = reference(*views(*ref))
    assert state is None
    assert_close(o, o_ref.detach(), "o")
    backward((o,), (o_ref,))
    for name, a, e in zip(("dq", "dk", "dv"), ours, ref):
        assert_close(a.grad, e.grad, name)


def test_half_inputs():
    """fp16 features and values: output in fp16, fp32 states."""
    rand = Rand(2)
    length, features, value_dim = 33, 16, 16
    q, k = rand.positive(B, length, H, features), rand.positive(B, length, H, features)
    v = rand.normal(B, length, H, value_dim)
    o, (kv, z) = linear.linear_attention(q.half(), k.half(), v.half(), output_final_state=True, chunk_size=16)
    o_ref, (kv_ref, z_ref) = reference(q.double(), k.double(), v.double(), output_final_state=True)
    assert o.dtype == torch.float16 and kv.dtype == z.dtype == torch.float32
    for name, a, e in (("o", o, o_ref), ("kv", kv, kv_ref), ("z", z, z_ref)):
        assert_close(a, e, name, tol=1e-2)

    # autocast's mix (fp32 softmax features next to fp16 v) runs in the 16-bit dtype, as all-16-bit inputs do
    o_mixed, (kv_mixed, _) = linear.linear_attention(q, k, v.half(), output_final_state=True, chunk_size=16)
    assert o_mixed.dtype == torch.float16 and kv_mixed.dtype == torch.float32
    torch.testing.assert_close(o_mixed, o)
    torch.testing.assert_close(kv_mixed, kv)


@pytest.mark.parametrize("with_state", [True, False])
def test_decode_steps(with_state):
    """Prefill, then decode steps with the fused kernel, chained through the state, against the reference."""
    rand = Rand(3)
    features, value_dim, steps = 32, 16, 3
    q, k = rand.positive(B, 5 + steps, H, features), rand.positive(B, 5 + steps, H, features)
    v = rand.normal(B, 5 + steps, H, value_dim)
    mask = left_padding_mask(5 + steps)
    mask[0, -2] = False  # a padded decode step: its key must not enter the state
    state = ref_state = None
    if with_state:
        state = linear.linear_attention(q[:, :5], k[:, :5], v[:, :5], mask[:, :5], output_final_state=True)[1]
        ref_state = reference(
            q[:, :5].double(), k[:, :5].double(), v[:, :5].double(), mask[:, :5], output_final_state=True
        )[1]
    for t in range(5, 5 + steps):
        args = (q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], mask[:, t : t + 1])
        o, state = linear.linear_attention_recurrent(*args, initial_state=state, output_final_state=True)
        o_ref, ref_state = reference_recurrent(
            *(a.double() for a in args[:3]), args[3], ref_state, output_final_state=True
        )
        assert o.dtype == state[0].dtype == state[1].dtype == torch.float32
        assert_close(o, o_ref, f"o step {t}")
        assert_close(state[0], ref_state[0], f"kv step {t}")
        assert_close(state[1], ref_state[1], f"z step {t}")
    o, final = linear.linear_attention_recurrent(q[:, :1], k[:, :1], v[:, :1], initial_state=state)
    assert final is None
    assert_close(o, reference_recurrent(q[:, :1].double(), k[:, :1].double(), v[:, :1].double(), None, ref_state)[0])


def test_recurrent_prefill_and_decode_gradients():
    """linear_attention_recurrent with T > 1, and with T = 1 under autograd, runs the chunked op: same result."""
    rand = Rand(4)
    features, value_dim = 16, 16
    for length in (9, 1):
        q, k = rand.positive(B, length, H, features), rand.positive(B, length, H, features)
        v = rand.normal(B, length, H, value_dim)
        kv0, z0 = rand.positive(B, H, features, value_dim), rand.positive(B, H, features)
        ours, ref = leaves(q, k, v, kv0, z0)
        o, (kv, z) = linear.linear_attention_recurrent(*ours[:3], None, tuple(ours[3:]), True)
        o_ref, (kv_ref, z_ref) = reference_recurrent(*ref[:3], None, tuple(ref[3:]), True)
        assert_close(o, o_ref.detach(), "o")
        assert_close(kv, kv_ref.detach(), "kv")
        backward((o, kv, z), (o_ref, kv_ref, z_ref))
        for name, a, e in zip(("dq", "dk", "dv", "dkv0", "dz0"), ours, ref):
            assert_close(a.grad, e.grad, f"{name} T={length}")


def bad_inputs():
    rand = Rand(5)
    q, k, v = rand.positive(B, 4, H, 16), rand.positive(B, 4, H, 16), rand.normal(B, 4, H, 8)
    kv0, z0 = rand.positive(B, H, 16, 8), rand.positive(B, H, 16)
    return [
        ((q[0], k, v), {}),
        ((q, k[:, :3], v), {}),
        ((q, k, v[:1]), {}),
        ((q, k, v), {"key_mask": torch.ones(B, 5, device=DEVICE)}),
        ((q, k, v), {"initial_state": kv0}),
        ((q, k, v), {"initial_state": (kv0[..., :4], z0)}),
        ((q, k, v), {"initial_state": (kv0, z0[:1])}),
    ]


@pytest.mark.parametrize("case", range(len(bad_inputs())))
@pytest.mark.parametrize(
    "ours, ref",
    [(linear.linear_attention, reference), (linear.linear_attention_recurrent, reference_recurrent)],
    ids=["linear_attention", "linear_attention_recurrent"],
)
def test_bad_input_raises_reference_error(ours, ref, case):
    args, kwargs = bad_inputs()[case]
    with pytest.raises(ValueError) as expected:
        ref(*args, **kwargs)
    with pytest.raises(ValueError) as got:
        ours(*args, **kwargs)
    assert str(got.value) == str(expected.value)


def test_bad_chunk_size_raises_reference_error():
    rand = Rand(6)
    q, v = rand.positive(B, 4, H, 16), rand.normal(B, 4, H, 8)
    with pytest.raises(ValueError) as expected:
        reference(q, q, v, chunk_size=0)
    with pytest.raises(ValueError) as got:
        linear.linear_attention(q, q, v, chunk_size=0)
    assert str(got.value) == str(expected.value)
