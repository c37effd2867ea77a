"""The Triton Taylor kernels (taylor_linear_attention, taylor_linear_attention_recurrent) against the references.

Under the Triton interpreter (see conftest.py) with fp32 inputs and chunks of 16 in segments of 32 tokens, so that
these small problems span several segments and end on a ragged chunk; the references run on fp64 copies. The chunked
op's tests run both of its algorithms (the scan and two_pass.py). With TRITON_INTERPRET=0 and a GPU, the same tests
run the compiled kernels.
"""

import pytest
import torch
from triton_helpers import DEVICE, Rand, left_padding_mask

from hf_based.kernels.taylor import triton as taylor
from hf_based.kernels.taylor import two_pass
from hf_based.kernels.taylor.reference import taylor_linear_attention as reference
from hf_based.kernels.taylor.reference import taylor_linear_attention_recurrent as reference_recurrent

B, H = 2, 2
BLOCKS = dict(chunk=16, segment=32)
ALGORITHMS = pytest.mark.parametrize("algorithm", taylor.ALGORITHMS)


@pytest.fixture(autouse=True)
def small_state_blocks(monkeypatch):
    """Two-pass state slices of 16 value columns, so that value_dim 32 spans two of them."""
    monkeypatch.setattr(two_pass, "BLOCK_V_STATES", 16)


class TaylorRand(Rand):
    """States are real ones (the reference run on a random prefix), so that their normaliser stays positive like the
    kernels' own."""

    def state(self, d, value_dim):
        prefix = [self.normal(B, 9, H, n) for n in (d, d, value_dim)]
        return reference(*prefix, output_final_state=True)[1]


def assert_close(actual, expected, name, tol=1e-4):
    """Relative L2 error <= tol."""
    assert actual.shape == expected.shape, name
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    actual, expected = actual.double(), expected.double()
    error = ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    assert error <= tol, f"{name}: relative L2 error {error:.2e} > {tol:.0e}"


def run(op, q, k, v, key_mask, state, weights, **blocks):
    """Output and final state of op, and the gradients of a loss on both to q, k, v (and the initial state)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, *(state or ()))]
    o, (kv, z) = op(*leaves[:3], key_mask, tuple(leaves[3:]) or None, True, **blocks)
    loss = sum((x * w.to(x.dtype)).sum() for x, w in zip((o, kv, z), weights))
    grads = torch.autograd.grad(loss, leaves)
    return (o, kv, z, *grads)


NAMES = ("o", "kv", "z", "dq", "dk", "dv", "dkv0", "dz0")


@pytest.mark.parametrize(
    "length, d, value_dim, masked, with_state, block_v",
    [
        (1, 16, 16, True, True, 16),
        (17, 16, 32, False, True, 16),  # two value blocks: dq, dk summed over them
        (63, 32, 16, True, False, 16),
        (130, 16, 32, True, True, 32),
        (130, 32, 32, False, False, 16),
        (40, 8, 16, True, True, 16),  # d padded to 16
    ],
)
@ALGORITHMS
def test_chunked_matches_reference(length, d, value_dim, masked, with_state, block_v, algorithm):
    rand = TaylorRand(length + d)
    q, k, v = (rand.normal(B, length, H, n) for n in (d, d, value_dim))
    key_mask = left_padding_mask(length) if masked else None
    state = rand.state(d, value_dim) if with_state else None
    features = 1 + d + d * d
    shapes = ((B, length, H, value_dim), (B, H, features, value_dim), (B, H, features))
    weights = [rand.normal(*shape) for shape in shapes]
    blocks = dict(BLOCKS, block_v=block_v, block_v_bwd=block_v, algorithm=algorithm)
    actual = run(taylor._taylor_linear_attention, q, k, v, key_mask, state, weights, **blocks)
    expected = run(
        reference, *(x.double() for x in (q, k, v)), key_mask, state and tuple(x.double() for x in state), weights
    )
    for name, a, e in zip(NAMES, actual, expected):
        assert_close(a, e, name)


@ALGORITHMS
def test_padded_keys_are_excluded(algorithm):
    """Padding in front changes nothing for the real tokens, their gradients included; padded keys get none."""
    rand = TaylorRand(1)
    q, k, v = (rand.normal(1, 50, H, n) for n in (16, 16, 16))
    pad = 23
    key_mask = torch.arange(50, device=DEVICE)[None] >= pad
    blocks = dict(BLOCKS, algorithm=algorithm)
    full = run(taylor._taylor_linear_attention, q, k, v, key_mask, None, (v,), **blocks)
    tail = run(taylor._taylor_linear_attention, *(x[:, pad:] for x in (q, k, v)), None, None, (v[:, pad:],), **blocks)
    for name, a, e in zip(("o", "kv", "z", "dq", "dk", "dv"), full, tail):
        if name in ("o", "dq", "dk", "dv"):
            assert_close(a[:, pad:], e, name, tol=1e-5)
        else:
            assert_close(a, e, name, tol=1e-5)
    assert full[4][:, :pad].abs().max() == 0 and full[5][:, :pad].abs().max() == 0


@ALGORITHMS
def test_default_blocks_and_no_state(monkeypatch, algorithm):
    """Public signature, module block sizes (more than one segment for the two-pass op), outputs without final
    state."""
    monkeypatch.setattr(taylor, "ALGORITHM", algorithm)
    rand = TaylorRand(2)
    q, k, v = (rand.normal(B, 300, H, n) for n in (16, 16, 64))
    o, final = taylor.taylor_linear_attention(q, k, v)
    assert final is None and o.dtype == v.dtype
    assert_close(o, reference(q.double(), k.double(), v.double())[0], "o")


def test_unknown_algorithm_is_refused():
    q, k, v = (torch.ones(1, 3, 1, 16, device=DEVICE) for _ in range(3))
    message = raised(lambda: taylor._taylor_linear_attention(q, k, v, algorithm="fused"))
    assert message == "algorithm='fused': expected one of ('scan', 'two_pass')"
    with pytest.raises(ValueError, match="segment=40 must be a multiple of chunk=16"):
        taylor._taylor_linear_attention(q, k, v, algorithm="two_pass", chunk=16, segment=40)


@pytest.mark.parametrize("length, d, value_dim", [(1, 16, 32), (1, 32, 16), (1, 16, 80), (5, 16, 16)])
def test_recurrent_matches_reference(length, d, value_dim):
    """T = 1: the decode kernel (states written to new tensors); T > 1: the chunked op."""
    rand = TaylorRand(3)
    q, k, v = (rand.normal(3, length, H, n) for n in (d, d, value_dim))
    prefix = [rand.normal(3, 9, H, n) for n in (d, d, value_dim)]
    state = reference(*prefix, output_final_state=True)[1]
    key_mask = torch.tensor([[True], [False], [True]], device=DEVICE).expand(3, length)
    for mask, start in ((key_mask, state), (None, None)):
        copies = start and tuple(x.clone() for x in start)
        with torch.no_grad():
            o, (kv, z) = taylor.taylor_linear_attention_recurrent(q, k, v, mask, start, True)
        expected = reference_recurrent(
            *(x.double() for x in (q, k, v)), mask, start and tuple(x.double() for x in start), True
        )
        for name, a, e in zip(("o", "kv", "z"), (o, kv, z), (expected[0], *expected[1])):
            assert_close(a, e, name)
        if start is not None:
            assert all(torch.equal(a, b) for a, b in zip(start, copies)), "initial_state was modified"
    o, final = taylor.taylor_linear_attention_recurrent(q, k, v)
    assert final is None
    assert_close(o, reference_recurrent(q.double(), k.double(), v.double())[0], "o")


def raised(op, *args):
    with pytest.raises(ValueError) as info:
        op(*args)
    return str(info.value)


@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 5, 2), (2, 5, 2, 16), (2, 5, 2, 8)),  # q not 4-d
        ((2, 5, 2, 16), (2, 5, 2, 8), (2, 5, 2, 8)),  # k's dim
        ((2, 5, 2, 16), (2, 4, 2, 16), (2, 5, 2, 8)),  # k's length (checked on its features)
        ((2, 5, 2, 16), (2, 5, 2, 16), (2, 5, 3, 8)),  # v's heads
    ],
)
def test_bad_input_raises_reference_error(shapes):
    q, k, v = (torch.zeros(s, device=DEVICE) for s in shapes)
    for op, ref in (
        (taylor.taylor_linear_attention, reference),
        (taylor.taylor_linear_attention_recurrent, reference_recurrent),
    ):
        assert raised(op, q, k, v) == raised(ref, q, k, v)


def test_bad_mask_and_state_raise_reference_error():
    q, k, v = (torch.zeros(2, 5, 2, n, device=DEVICE) for n in (16, 16, 8))
    features = 1 + 16 + 256
    cases = [
        (torch.ones(2, 4, dtype=torch.bool, device=DEVICE), None),
        (None, (torch.zeros(2, 2, features, 7, device=DEVICE), torch.zeros(2, 2, features, device=DEVICE))),
        (None, torch.zeros(2, 2, features, 8, device=DEVICE)),
    ]
    for key_mask, state in cases:
        for op, ref in (
            (taylor.taylor_linear_attention, reference),
            (taylor.taylor_linear_attention_recurrent, reference_recurrent),
        ):
            assert raised(op, q, k, v, key_mask, state) == raised(ref, q, k, v, key_mask, state)
