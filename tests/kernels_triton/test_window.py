"""The Triton window kernels (softmax_attention, hybrid_attention, hybrid_attention_recurrent) against the references.

Under the Triton interpreter (see conftest.py) with fp32 inputs and blocks of 16, so that these small problems span
several blocks; the references run on fp64 copies. With TRITON_INTERPRET=0 and a GPU, the same tests run the compiled
kernels.
"""

import functools
from unittest.mock import patch

import pytest
import torch
from triton_helpers import DEVICE, Rand, left_padding_mask, run_with_grads

import hf_based.kernels as kernels
from hf_based.kernels import dispatch
from hf_based.kernels.hybrid import triton as hybrid
from hf_based.kernels.hybrid.reference import hybrid_attention as reference_hybrid
from hf_based.kernels.hybrid.reference import hybrid_attention_recurrent as reference_hybrid_recurrent
from hf_based.kernels.softmax import triton as softmax
from hf_based.kernels.softmax.cpu import plain_causal
from hf_based.kernels.softmax.reference import softmax_attention as reference_softmax

B, H, HKV, D, DV, FEAT = 2, 4, 2, 16, 32, 16


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 16; windows above 8 (16 and None) take the split loops, smaller ones the single masked loop."""
    for name in ("BLOCK_M", "BLOCK_M_FULL", "BLOCK_N"):
        monkeypatch.setattr(softmax, name, 16)
    for name in ("BLOCK_T", "BLOCK_K", "BLOCK_V", "BLOCK_DECODE"):
        monkeypatch.setattr(hybrid, name, 16)
    monkeypatch.setattr(softmax, "SPLIT_WINDOW", 8)  # the hybrid kernels' window tiles split alike


def assert_close(actual, expected, name="", tol=1e-4):
    """Relative L2 error <= tol, with a floor for results that are 0 up to rounding (e.g. dq of a single key)."""
    assert actual.shape == expected.shape, name
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).norm().item()
    bound = tol * (expected.norm().item() + 1e-2 * expected.numel() ** 0.5)
    assert error <= bound, f"{name}: |error| {error:.3g} > {bound:.3g} (|expected| {expected.norm().item():.3g})"


def as_fp64(tensors):
    return [x.double() for x in tensors]


# --- softmax attention ----------------------------------------------------------------------------------------------

SOFTMAX_CASES = [  # q_len, k_len, window, padded, (heads, kv heads)
    (1, 1, None, True, (H, HKV)),
    (1, 1, 1, False, (H, HKV)),
    (17, 17, 5, True, (H, HKV)),
    (17, 17, None, False, (H, HKV)),
    (63, 63, 16, False, (H, HKV)),
    (63, 63, 1, True, (H, HKV)),
    (130, 130, None, True, (2, 1)),
    (130, 130, 16, False, (2, 1)),
    (17, 63, None, True, (H, HKV)),  # cached prefix keys
    (17, 63, 16, False, (H, HKV)),
    (1, 40, 5, True, (H, HKV)),
]


@pytest.mark.parametrize("q_len, k_len, window_size, padded, heads", SOFTMAX_CASES)
def test_softmax_attention_matches_reference(q_len, k_len, window_size, padded, heads):
    rand = Rand(q_len * 1000 + k_len)
    heads, kv_heads = heads
    inputs = [rand.normal(B, q_len, heads, D), rand.normal(B, k_len, kv_heads, D), rand.normal(B, k_len, kv_heads, DV)]
    mask = left_padding_mask(k_len) if padded else None
    grad_out = rand.normal(B, q_len, heads, DV)
    o, grads = run_with_grads(softmax.softmax_attention, inputs, grad_out, window=window_size, key_mask=mask)
    expected, expected_grads = run_with_grads(
        reference_softmax, as_fp64(inputs), grad_out, window=window_size, key_mask=mask
    )
    assert o.dtype == torch.float32
    assert_close(o, expected, "o")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(grad, expected_grad, name)


def test_softmax_attention_queries_without_keys_are_zero():
    rand = Rand(1)
    length = 20
    q, k, v = rand.normal(B, length, H, D), rand.normal(B, length, HKV, D), rand.normal(B, length, HKV, DV)
    mask = left_padding_mask(length)
    grad_out = rand.normal(B, length, H, DV)
    o, grads = run_with_grads(softmax.softmax_attention, [q, k, v], grad_out, window=4, key_mask=mask)
    empty = length - length // 2  # row 1's queries before its first real key see nothing
    assert torch.equal(o[1, :empty], torch.zeros_like(o[1, :empty]))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][1, :empty], torch.zeros_like(grads[0][1, :empty]))  # dq
    assert torch.equal(grads[1][1, :empty], torch.zeros_like(grads[1][1, :empty]))  # dk of the padded keys


def test_softmax_attention_layouts_dtypes_and_scale():
    """Odd head dims, strided views (grads keep the inputs' strides), a custom scale, fp16 and the fp64 fallback."""
    rand = Rand(2)
    length, dim, value_dim = 33, 20, 12
    q = rand.normal(B, H, length, dim).transpose(1, 2)  # dense but not contiguous: used in place
    k = rand.normal(B, length, HKV, 2 * dim)[..., :dim]  # gaps between rows: copied
    v = rand.normal(B, length, HKV, value_dim)
    grad_out = rand.normal(B, length, H, value_dim)
    kwargs = dict(window=7, scale=0.3)
    o, grads = run_with_grads(softmax.softmax_attention, [q, k, v], grad_out, **kwargs)
    expected, expected_grads = run_with_grads(reference_softmax, as_fp64([q, k, v]), grad_out, **kwargs)
    assert_close(o, expected, "o")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(grad, expected_grad, name)

    o16, grads16 = run_with_grads(softmax.softmax_attention, [x.half() for x in (q, k, v)], grad_out, **kwargs)
    assert o16.dtype == torch.float16
    assert_close(o16, expected, "o fp16", tol=1e-2)
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads16, expected_grads):
        assert_close(grad, expected_grad, f"{name} fp16", tol=1e-2)

    torch.testing.assert_close(softmax.softmax_attention(*as_fp64([q, k, v]), **kwargs), expected)


SPLIT_CASES = [  # q_len, k_len, window, padded: few queries over many keys, as in decoding
    (1, 300, None, True),
    (1, 130, None, False),
    (3, 257, None, True),
    (1, 300, 100, False),
    (17, 300, None, True),  # two query blocks, each split
]


@pytest.mark.parametrize("q_len, k_len, window_size, padded", SPLIT_CASES)
def test_softmax_attention_key_splits_match_reference(monkeypatch, q_len, k_len, window_size, padded):
    """On a GPU with many SMs, one batch row of two heads splits its keys across programs (flash-decoding); the
    combined output and the gradients (through the combined log-sum-exp) match the reference."""
    monkeypatch.setattr(softmax, "multiprocessor_count", lambda device: 64)
    splits = []
    key_splits = softmax.key_splits
    monkeypatch.setattr(softmax, "key_splits", lambda *args: splits.append(key_splits(*args)) or splits[-1])
    rand = Rand(q_len * 7 + k_len)
    inputs = [rand.normal(1, q_len, 2, D), rand.normal(1, k_len, 1, D), rand.normal(1, k_len, 1, DV)]
    mask = left_padding_mask(k_len)[1:] if padded else None
    grad_out = rand.normal(1, q_len, 2, DV)
    o, grads = run_with_grads(softmax.softmax_attention, inputs, grad_out, window=window_size, key_mask=mask)
    expected, expected_grads = run_with_grads(
        reference_softmax, as_fp64(inputs), grad_out, window=window_size, key_mask=mask
    )
    assert splits[0] > 1
    assert_close(o, expected, "o")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(grad, expected_grad, name)


def test_key_splits_only_when_programs_leave_the_gpu_idle():
    gpu = torch.device("cuda")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(softmax, "multiprocessor_count", lambda device: 132)
        assert softmax.key_splits(9, 129, gpu) == 30  # batch 1, 9 heads over 8k keys: ~2 programs per SM
        assert softmax.key_splits(576, 129, gpu) == 1  # batch 64
        assert softmax.key_splits(9, 3, gpu) == 1  # a 64-key window


def test_plain_causal_attention_runs_sdpa_on_the_gpu_route(monkeypatch):
    """The dispatched op's GPU route: plain causal attention in 16 bits (no window, no key mask, as many queries as
    keys; GQA) goes to SDPA's is_causal and gives the reference's output; a key mask, a window, fewer queries than
    keys or fp32 go to the Triton kernel. fp16 (the interpreter cannot run bf16 kernels; bf16 takes the same route)."""
    monkeypatch.setattr(dispatch, "use_triton", lambda x: True)
    rand = Rand(13)
    q, k, v = rand.normal(B, 37, H, D), rand.normal(B, 37, HKV, D), rand.normal(B, 37, HKV, DV)
    calls = []
    monkeypatch.setattr(kernels, "causal_attention_sdpa", wraps(kernels.causal_attention_sdpa, calls, "sdpa"))
    monkeypatch.setattr(softmax, "softmax_attention", wraps(softmax.softmax_attention, calls, "triton"))
    cases = [
        ((q, k, v), {}, "sdpa"),
        ((q, k, v), dict(key_mask=left_padding_mask(37)), "triton"),
        ((q, k, v), dict(window=5), "triton"),
        ((q[:, -9:], k, v), {}, "triton"),
    ]
    for inputs, kwargs, route in cases:
        calls.clear()
        o = kernels.softmax_attention(*(x.half() for x in inputs), **kwargs)
        assert calls == [route]
        assert_close(o, reference_softmax(*as_fp64(inputs), **kwargs), route, tol=1e-2)
    calls.clear()
    kernels.softmax_attention(q, k, v)
    assert calls == ["triton"]  # fp32
    assert plain_causal(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None)


def wraps(fn, calls, name):
    def call(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return call


# --- hybrid attention -----------------------------------------------------------------------------------------------

# On a GPU, fp32 hybrid attention runs the reference (see hybrid.runs_reference): an fp32 test there would compare the
# reference with itself.
fp32_hybrid_kernel = pytest.mark.skipif(
    hybrid.runs_reference(torch.float32, torch.device(DEVICE)),
    reason="fp32 hybrid attention runs the reference on a GPU (Triton 3.6 fails to compile the fp32 hybrid kernels)",
)


def hybrid_inputs(rand, q_len, k_len, features=FEAT, heads=(H, HKV)):
    """[q, k, v, q_feat, k_feat, window_factor]: GQA raw values, positive features per query head, window_factor in (0.1, 1.1)."""
    heads, kv_heads = heads
    return [
        rand.normal(B, q_len, heads, D),
        rand.normal(B, k_len, kv_heads, D),
        rand.normal(B, k_len, kv_heads, DV),
        rand.positive(B, q_len, heads, features),
        rand.positive(B, k_len, heads, features),
        rand.positive(heads),
    ]


def hybrid_state(rand, features=FEAT, heads=H):
    return [rand.positive(B, heads, features, DV), rand.positive(B, heads, features)]


def run_hybrid(op, inputs, state, grad_out, window_size, mask):
    """op's (o, final state) and the gradients w.r.t. the inputs and the initial state (if any)."""

    def call(*args):
        initial = tuple(args[6:]) if state else None
        return op(*args[:6], window_size, key_mask=mask, initial_state=initial, output_final_state=True)

    return run_with_grads(call, inputs + state, grad_out)


HYBRID_CASES = [  # q_len, k_len, window, padded, initial state, features, (heads, kv heads)
    (1, 1, 1, True, True, 16, (H, HKV)),
    (17, 17, 5, False, True, 32, (H, HKV)),
    (63, 63, 16, True, False, 16, (H, HKV)),
    (63, 63, 1, False, True, 16, (H, HKV)),
    (130, 130, 16, True, True, 16, (2, 1)),
    (17, 63, 16, True, True, 16, (H, HKV)),  # cached prefix keys
    (17, 63, 5, False, False, 16, (H, HKV)),
    (1, 40, 5, True, True, 16, (H, HKV)),
]


@fp32_hybrid_kernel
@pytest.mark.parametrize("q_len, k_len, window_size, padded, with_state, features, heads", HYBRID_CASES)
def test_hybrid_attention_matches_reference(q_len, k_len, window_size, padded, with_state, features, heads):
    check_hybrid_against_reference(q_len, k_len, window_size, padded, with_state, features, heads)


SEGMENT_CASES = [  # as HYBRID_CASES: long enough for several chunks of 16 keys
    (130, 130, 16, True, True, 16, (2, 1)),
    (300, 300, 5, False, False, 16, (2, 1)),
    (100, 300, 16, True, True, 16, (2, 1)),  # cached prefix keys: chunks before the queries
    (1, 300, 16, False, True, 16, (2, 1)),
]


@fp32_hybrid_kernel
@pytest.mark.parametrize("q_len, k_len, window_size, padded, with_state, features, heads", SEGMENT_CASES)
def test_hybrid_attention_state_segments_match_reference(
    monkeypatch, q_len, k_len, window_size, padded, with_state, features, heads
):
    """On a GPU with many SMs, few heads scan their linear states in sequence-parallel segments."""
    monkeypatch.setattr(softmax, "multiprocessor_count", lambda device: 64)
    splits = []
    key_splits = hybrid.key_splits
    monkeypatch.setattr(hybrid, "key_splits", lambda *args: splits.append(key_splits(*args)) or splits[-1])
    check_hybrid_against_reference(q_len, k_len, window_size, padded, with_state, features, heads)
    assert min(splits) > 1


def check_hybrid_against_reference(q_len, k_len, window_size, padded, with_state, features, heads):
    rand = Rand(q_len * 1000 + k_len + window_size)
    inputs = hybrid_inputs(rand, q_len, k_len, features, heads)
    state = hybrid_state(rand, features, heads[0]) if with_state else []
    mask = left_padding_mask(k_len) if padded else None
    grad_out = rand.normal(B, q_len, heads[0], DV)
    if padded and not with_state:  # the reference's gradient is NaN at queries without any key (see below)
        grad_out[1, : max(q_len - k_len // 2, 0)] = 0
    (o, final), grads = run_hybrid(hybrid.hybrid_attention, inputs, state, grad_out, window_size, mask)
    (expected, expected_final), expected_grads = run_hybrid(
        reference_hybrid, as_fp64(inputs), as_fp64(state), grad_out, window_size, mask
    )
    assert o.dtype == torch.float32 and final[0].dtype == final[1].dtype == torch.float32
    assert_close(o, expected, "o")
    assert_close(final[0], expected_final[0], "final kv")
    assert_close(final[1], expected_final[1], "final z")
    names = ("dq", "dk", "dv", "dq_feat", "dk_feat", "dwindow_factor", "dkv0", "dz0")
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert_close(grad, expected_grad, name)


@fp32_hybrid_kernel
def test_hybrid_attention_queries_without_keys():
    """A query that sees no real key and has no state gets o = 0 and passes no gradient back (the reference's
    autograd gives NaN there: 0 * (do / tiny) overflows)."""
    rand = Rand(3)
    length = 30
    inputs = hybrid_inputs(rand, length, length)
    mask = left_padding_mask(length)
    grad_out = rand.normal(B, length, H, DV)
    (o, _), grads = run_hybrid(hybrid.hybrid_attention, inputs, [], grad_out, 5, mask)
    empty = length - length // 2
    assert torch.equal(o[1, :empty], torch.zeros_like(o[1, :empty]))
    grad_out[1, :empty] = 0
    (_, _), expected_grads = run_hybrid(reference_hybrid, as_fp64(inputs), [], grad_out, 5, mask)
    for name, grad, expected_grad in zip(
        ("dq", "dk", "dv", "dq_feat", "dk_feat", "dwindow_factor"), grads, expected_grads
    ):
        assert_close(grad, expected_grad, name)


def test_hybrid_attention_dtypes_and_final_state_gradient():
    rand = Rand(4)
    length, window_size = 20, 8
    inputs = hybrid_inputs(rand, length, length)
    grad_out = rand.normal(B, length, H, DV)
    (expected, _), expected_grads = run_hybrid(reference_hybrid, as_fp64(inputs), [], grad_out, window_size, None)
    half = [x.half() if x.dim() == 4 else x for x in inputs]  # window_factor stays fp32
    (o, _), grads = run_hybrid(hybrid.hybrid_attention, half, [], grad_out, window_size, None)
    assert o.dtype == torch.float16
    assert_close(o, expected, "o fp16", tol=1e-2)
    for name, grad, expected_grad in zip(
        ("dq", "dk", "dv", "dq_feat", "dk_feat", "dwindow_factor"), grads, expected_grads
    ):
        assert_close(grad, expected_grad, f"{name} fp16", tol=1e-2)

    # autocast's mix (fp32 q, k and features after RoPE, 16-bit v) runs in the 16-bit dtype, as all-16-bit inputs do
    mixed = [x.half() if i == 2 else x for i, x in enumerate(inputs)]
    o_mixed, _ = hybrid.hybrid_attention(*mixed, window_size)
    assert o_mixed.dtype == torch.float16
    torch.testing.assert_close(o_mixed, hybrid.hybrid_attention(*half, window_size)[0])

    fp64 = as_fp64(inputs)
    torch.testing.assert_close(hybrid.hybrid_attention(*fp64, window_size)[0], reference_hybrid(*fp64, window_size)[0])

    leaves = [x.clone().requires_grad_() for x in half]  # 16-bit: the kernel's path on a GPU too
    _, (kv, z) = hybrid.hybrid_attention(*leaves, window_size, output_final_state=True)
    with pytest.raises(NotImplementedError, match="final_state"):
        (kv.sum() + z.sum()).backward()


DECODE_CASES = [  # k_len, window, padded, initial state
    (1, 4, False, True),
    (4, 4, True, True),
    (9, 4, True, False),
    (5, 16, False, True),
    (40, 16, True, True),
]


@fp32_hybrid_kernel
@pytest.mark.parametrize("k_len, window_size, padded, with_state", DECODE_CASES)
def test_hybrid_decode_step_matches_reference_recurrent(k_len, window_size, padded, with_state):
    rand = Rand(k_len * 100 + window_size)
    inputs = hybrid_inputs(rand, 1, k_len)
    state = tuple(hybrid_state(rand)) if with_state else None
    mask = left_padding_mask(k_len) if padded else None
    kwargs = dict(key_mask=mask, output_final_state=True)
    with torch.no_grad():
        o, final = hybrid.hybrid_attention_recurrent(*inputs, window_size, initial_state=state, **kwargs)
    expected, expected_final = reference_hybrid_recurrent(
        *as_fp64(inputs), window_size, initial_state=state and tuple(as_fp64(state)), **kwargs
    )
    assert_close(o, expected, "o")
    assert_close(final[0], expected_final[0], "final kv")
    assert_close(final[1], expected_final[1], "final z")


@fp32_hybrid_kernel
def test_hybrid_recurrent_prefill_uses_the_parallel_form():
    rand = Rand(5)
    inputs = hybrid_inputs(rand, 9, 20)
    state = tuple(hybrid_state(rand))
    o, final = hybrid.hybrid_attention_recurrent(*inputs, 4, initial_state=state, output_final_state=True)
    expected, expected_final = reference_hybrid_recurrent(
        *as_fp64(inputs), 4, initial_state=tuple(as_fp64(state)), output_final_state=True
    )
    assert_close(o, expected, "o")
    assert_close(final[0], expected_final[0], "final kv")


@fp32_hybrid_kernel
@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("q_len, k_len, late", [(1, 40, 1), (17, 40, 5), (63, 63, 64), (70, 130, 7)])
def test_hybrid_late_sinks_without_a_linear_term_run_in_one_kernel(monkeypatch, q_len, k_len, late, early):
    """Late sinks (the keys the last `late` queries see instead of the sinks, as after a prefill's choice of
    retrieval keys), padded rows: without a linear term, one forward kernel serves early and late queries (several
    sink tiles each, the late queries starting within a query block or covering all of them) and gives the
    reference's output and empty state; with one, two calls give the reference's output and state. The late rows
    differ from those without late sinks (so the test can fail)."""
    monkeypatch.setattr(hybrid, "BLOCK_SINKS", 16)
    rand, window = Rand(q_len * 3 + k_len + late), 5
    q, k, v, q_feat, k_feat, factor = hybrid_inputs(rand, q_len, k_len)
    mask = left_padding_mask(k_len)
    first = mask & (mask.cumsum(1) <= 3)
    late_sinks = first | (mask & (torch.arange(k_len, device=DEVICE) % 3 == 0))  # the sinks and scattered keys
    bounds = dict(max_sinks=5 if early else None, max_late_sinks=int(late_sinks.sum(1).max()) + 3)
    kwargs = dict(key_mask=mask, sink_mask=first if early else None, output_final_state=True, **bounds)
    for features in (0, FEAT):
        inputs = [q, k, v, q_feat[..., :features], k_feat[..., :features], factor]
        late_kwargs = dict(kwargs, late_sink_mask=late_sinks, late_queries=late)
        expected, expected_state = reference_hybrid(*as_fp64(inputs), window, **late_kwargs)
        without, _ = reference_hybrid(*as_fp64(inputs), window, **kwargs)
        assert not torch.allclose(expected[:, -late:], without[:, -late:])
        with patch.object(hybrid, "_hybrid_fwd", wraps=hybrid._hybrid_fwd) as forward:
            o, final = hybrid.hybrid_attention(*inputs, window, **late_kwargs)
        assert forward.call_count == (2 if features and late < q_len else 1)
        assert_close(o, expected, f"o, {features} features")
        for got, want in zip(final, expected_state):
            assert_close(got, want, f"state, {features} features")


def as_positions(mask: torch.Tensor, rand: Rand) -> torch.Tensor:
    """The keys of mask [B, Tk] by position, in a shuffled order, with empty slots (-1, Tk + 3) and the padded keys'
    positions (which the op leaves out) among them."""
    rows = [torch.nonzero(row).flatten().tolist() + [-1, row.shape[0] + 3] for row in mask]
    width = max(map(len, rows))
    index = torch.tensor([row + [-1] * (width - len(row)) for row in rows], device=mask.device)
    return index[:, torch.argsort(rand.normal(width))]


@fp32_hybrid_kernel
@pytest.mark.parametrize("q_len, k_len, late", [(1, 40, 1), (17, 40, 5), (70, 130, 7)])
def test_hybrid_sinks_by_position_match_the_masks(monkeypatch, q_len, k_len, late):
    """Sinks and late sinks given by position (shuffled, with empty slots and padded keys listed): the forward kernel
    reads them where they are and gives the reference's output with the masks, early list or not; with features (two
    calls) and with gradients (the blockwise form) the op makes masks of them."""
    monkeypatch.setattr(hybrid, "BLOCK_SINKS", 16)
    rand, window = Rand(q_len * 5 + k_len + late), 5
    q, k, v, q_feat, k_feat, factor = hybrid_inputs(rand, q_len, k_len)
    mask = left_padding_mask(k_len)
    first = mask & (mask.cumsum(1) <= 3)
    late_sinks = first | (mask & (torch.arange(k_len, device=DEVICE) % 3 == 0))
    padded_first = first | ~mask  # padded keys listed: the op drops them as the masks' `& key_mask` does
    for features in (0, FEAT):
        inputs = [q, k, v, q_feat[..., :features], k_feat[..., :features], factor]
        for early in (True, False):
            kwargs = dict(key_mask=mask, sink_mask=first if early else None, late_sink_mask=late_sinks)
            expected, _ = reference_hybrid(*as_fp64(inputs), window, late_queries=late, **kwargs)
            by_position = dict(key_mask=mask, late_queries=late, late_sink_index=as_positions(late_sinks | ~mask, rand))
            if early:
                by_position["sink_index"] = as_positions(padded_first, rand)
            with patch.object(hybrid, "_sink_positions", wraps=hybrid._sink_positions) as positions:
                o, _ = hybrid.hybrid_attention(*inputs, window, **by_position)
            by_index = [mask is None for call in positions.call_args_list for mask, _ in call.args[1]]
            assert by_index and all(by_index) if not features else not any(by_index)  # else the lists became masks
            assert_close(o, expected, f"o, {features} features, early {early}")
    inputs = [q, k, v, q_feat, k_feat, factor]
    grad_out = rand.normal(B, q_len, H, DV)
    (got, _), grads = run_with_grads(
        hybrid.hybrid_attention, inputs, grad_out, window=window, key_mask=mask, sink_index=as_positions(first, rand)
    )
    (expected, _), expected_grads = run_with_grads(
        reference_hybrid, as_fp64(inputs), grad_out.double(), window=window, key_mask=mask, sink_mask=first
    )
    assert_close(got, expected, "o with gradients")
    for name, got, want in zip(("q", "k", "v", "q_feat", "k_feat"), grads, expected_grads):
        assert_close(got, want, name)


# --- input validation -----------------------------------------------------------------------------------------------


def bad_calls():
    rand = Rand(6)
    q, k, v, qf, kf, window_factor = hybrid_inputs(rand, 5, 5)
    state = hybrid_state(rand)
    yield "softmax_attention", (q, k[..., :3], v), {}
    yield "softmax_attention", (q, k[:, :4], v), {}
    yield "softmax_attention", (q, k, v), dict(window=0)
    yield "softmax_attention", (q, k, v), dict(key_mask=torch.ones(B, 4, device=DEVICE))
    yield "hybrid_attention", (q, k, v, qf, kf, window_factor, None), {}
    yield "hybrid_attention", (q, k, v, qf, kf[:, :, :1], window_factor, 2), {}
    yield "hybrid_attention", (q, k, v, qf, kf, window_factor[:1], 2), {}
    yield "hybrid_attention", (q, k, v, qf, kf, window_factor, 2), dict(initial_state=state[0])
    sinks = torch.ones(B, 5, dtype=torch.bool, device=DEVICE)
    positions = torch.arange(3, device=DEVICE).expand(B, 3)
    for features in (qf, kf), (qf[..., :0], kf[..., :0]):  # two calls, one kernel
        args = (q, k, v, *features, window_factor, 2)
        yield "hybrid_attention", args, dict(late_sink_mask=sinks[:, :4], late_queries=2)
        yield "hybrid_attention", args, dict(late_sink_mask=sinks, late_queries=0)
        yield "hybrid_attention", args, dict(late_sink_index=positions, late_queries=0)
        yield "hybrid_attention", args, dict(late_sink_index=positions[:1], late_queries=2)
        yield "hybrid_attention", args, dict(sink_index=positions, sink_mask=sinks)
    yield (
        "hybrid_attention_recurrent",
        (q[:, :1], k, v, qf[:, :1], kf, window_factor, 2),
        dict(initial_state=(state[0], q)),
    )


@pytest.mark.parametrize("name, args, kwargs", list(bad_calls()))
def test_bad_inputs_raise_the_reference_errors(name, args, kwargs):
    references = dict(
        softmax_attention=reference_softmax,
        hybrid_attention=reference_hybrid,
        hybrid_attention_recurrent=reference_hybrid_recurrent,
    )
    with pytest.raises(ValueError) as expected:
        references[name](*args, **kwargs)
    with pytest.raises(ValueError) as raised:
        getattr(softmax if name == "softmax_attention" else hybrid, name)(*args, **kwargs)
    assert str(raised.value) == str(expected.value)


@fp32_hybrid_kernel
@pytest.mark.parametrize("scattered", [False, True])
@pytest.mark.parametrize("q_len, k_len, with_state", [(1, 40, True), (17, 40, True), (63, 63, False), (40, 130, True)])
def test_hybrid_attention_with_sinks_matches_reference(monkeypatch, q_len, k_len, with_state, scattered):
    """Sinks among cached and new keys of padded rows: both Triton entry points give the reference's outputs and
    state (the decode kernel at one query, the forward kernel's sink tiles otherwise); with gradients, the blockwise
    PyTorch form runs (the backward kernels have no sinks), and its gradients are the reference's too. Scattered:
    every fifth key is a sink too (as retrieved keys are), more than one tile of them. A bound on the sinks of a row
    (`max_sinks`, above the most of any row) changes nothing."""
    monkeypatch.setattr(hybrid, "BLOCK_SINKS", 16)
    rand, window = Rand(q_len + k_len), 5
    inputs = hybrid_inputs(rand, q_len, k_len)
    state = tuple(hybrid_state(rand)) if with_state else None
    mask = left_padding_mask(k_len)
    sinks = mask & ((mask.cumsum(1) <= 3) | (torch.arange(k_len) % 5 == 0 if scattered else False))
    kwargs = dict(key_mask=mask, output_final_state=True, sink_mask=sinks)
    fp64_state = as_fp64(state) if with_state else None
    expected, expected_state = reference_hybrid(*as_fp64(inputs), window, initial_state=fp64_state, **kwargs)
    bounded = functools.partial(hybrid.hybrid_attention, max_sinks=int(sinks.sum(1).max()) + 9)
    for op in (hybrid.hybrid_attention, hybrid.hybrid_attention_recurrent, bounded):
        o, final = op(*inputs, window, initial_state=state, **kwargs)
        assert_close(o, expected, str(op))
        for got, want in zip(final, expected_state):
            assert_close(got, want, str(op))
    grad_out = rand.normal(*expected.shape)
    _, grads = run_with_grads(bounded, inputs, grad_out, window=window, **kwargs)
    _, expected_grads = run_with_grads(reference_hybrid, as_fp64(inputs), grad_out.double(), window=window, **kwargs)
    for name, got, want in zip(("q", "k", "v", "q_feat", "k_feat", "window_factor"), grads, expected_grads):
        assert_close(got, want, name)


@fp32_hybrid_kernel
@pytest.mark.parametrize("q_len, k_len", [(1, 40), (17, 40), (63, 63)])
def test_hybrid_kernels_without_a_linear_term_are_the_window_and_sinks(monkeypatch, q_len, k_len):
    """No features (F = 0), as a hybrid layer without its linear term feeds them: both Triton entry points give the
    reference's output, which is then softmax over the window and the sinks alone, whatever the window factor, and
    an empty state."""
    monkeypatch.setattr(softmax, "multiprocessor_count", lambda device: 64)  # state scans split as on a GPU
    monkeypatch.setattr(softmax, "SPLIT_MIN_TILES", 1)
    rand, window = Rand(q_len * 7 + k_len), 5
    q, k, v, _, _, factor = hybrid_inputs(rand, q_len, k_len)
    q_feat, k_feat = q.new_zeros(*q.shape[:-1], 0), q.new_zeros(B, k_len, H, 0)
    mask = left_padding_mask(k_len)
    kwargs = dict(key_mask=mask, sink_mask=mask & (mask.cumsum(1) <= 3), output_final_state=True)
    state = (q.new_zeros(B, H, 0, DV), q.new_zeros(B, H, 0))
    expected, _ = reference_hybrid(*as_fp64([q, k, v, q_feat, k_feat, factor]), window, **kwargs)
    other_factor, _ = reference_hybrid(*as_fp64([q, k, v, q_feat, k_feat, factor + 1]), window, **kwargs)
    assert_close(other_factor, expected, "window factor")
    for op in (hybrid.hybrid_attention, hybrid.hybrid_attention_recurrent):
        o, (kv, z) = op(q, k, v, q_feat, k_feat, factor, window, initial_state=state, **kwargs)
        assert_close(o, expected, op.__name__)
        assert kv.shape == (B, H, 0, DV) and z.shape == (B, H, 0)
    # Without sinks the Triton backward runs (training through such a layer): the reference's gradients.
    inputs, grad_out = [q, k, v, q_feat, k_feat, factor], rand.normal(*expected.shape)
    _, grads = run_with_grads(hybrid.hybrid_attention, inputs, grad_out, window=window, key_mask=mask)
    _, expected_grads = run_with_grads(
        reference_hybrid, as_fp64(inputs), grad_out.double(), window=window, key_mask=mask
    )
    for name, got, want in zip(("q", "k", "v", "q_feat", "k_feat"), grads, expected_grads):
        assert_close(got, want, name)
    assert grads[-1].abs().max() < 1e-4  # the factor cancels out: no gradient but fp32 rounding
