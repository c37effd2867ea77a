"""The reference ops against independent naive formulas, in fp64 on CPU.

Each op is checked three ways: its parallel form, its recurrent (decode) form and a naive formula written here from
the spec (cumulative sums, explicit loops, torch's SDPA / Conv1d), plus state passing, padding, gradients, dtypes
and input validation.
"""

import math
from functools import partial
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F

from hf_based.kernels import (
    dispatch,
    hedgehog_feature_map,
    hybrid_attention,
    hybrid_attention_recurrent,
    linear_attention,
    linear_attention_recurrent,
    short_conv,
    short_conv_recurrent,
    softmax_attention,
    taylor_feature_map,
    taylor_linear_attention,
    taylor_linear_attention_recurrent,
    taylor_num_features,
)
from hf_based.kernels.hybrid import chunked
from hf_based.kernels.hybrid import reference as hybrid_reference
from hf_based.kernels.hybrid.chunked import hybrid_attention_chunked, hybrid_attention_recurrent_cpu
from hf_based.kernels.hybrid.reference import index_mask
from hf_based.kernels.retrieval import reference as retrieval_reference
from hf_based.kernels.retrieval.reference import KEPT_AFTER, KEPT_BEFORE, pool_neighbours
from hf_based.kernels.softmax.cpu import sdpa_over, softmax_attention_sdpa
from hf_based.kernels.softmax.reference import softmax_attention as softmax_attention_reference

LENGTHS = (1, 7, 63, 300)
# Hybrid attention's parallel forms: the reference, and the blockwise CPU path with blocks small enough that the
# test lengths span several (and some blocks shorter than the window).
HYBRID_PARALLEL = (
    hybrid_reference.hybrid_attention,
    partial(hybrid_attention_chunked, chunk=8),
    partial(hybrid_attention_chunked, chunk=5, max_scores=1),  # one block at a time
)
HYBRID_OPS = (*HYBRID_PARALLEL, hybrid_attention_recurrent)
B, H, HKV, D, DV, FEAT = 2, 4, 2, 3, 5, 6
close = partial(torch.testing.assert_close, rtol=1e-9, atol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")


class Rand:
    """Seeded fp64 inputs, never zero: randn for raw values, uniform in [0.1, 1.1) for features and states."""

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape):
        return torch.randn(*shape, generator=self.generator, dtype=torch.float64)

    def positive(self, *shape):
        return torch.rand(*shape, generator=self.generator, dtype=torch.float64) + 0.1


def left_padding_mask(length):
    """[2, T] bool: row 0 is all real, row 1 has only its last T // 2 tokens real (row 1 is all padding if T = 1)."""
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, : length - length // 2] = False
    return mask


# --- naive references, written from the spec ---------------------------------------------------------------------


def naive_linear(qf, kf, v, mask, kv0, z0, eps=1e-12):
    """Cumulative sums: kv_t = kv0 + sum_{j<=t} m_j phi(k_j) v_j^T, z_t likewise; -> o, (kv_T, z_T)."""
    kf = kf * mask[:, :, None, None]
    kv = kv0[:, None] + torch.cumsum(torch.einsum("bthf,bthd->bthfd", kf, v), dim=1)  # [B, T, H, F, Dv]
    z = z0[:, None] + torch.cumsum(kf, dim=1)  # [B, T, H, F]
    o = torch.einsum("bthf,bthfd->bthd", qf, kv) / (torch.einsum("bthf,bthf->bth", qf, z)[..., None] + eps)
    return o, (kv[:, -1], z[:, -1])


def visible_keys(q_len, k_len, window=None):
    """[Tq, Tk] bool: query i sits at key position p = Tk - Tq + i and sees p - window < j <= p."""
    p = torch.arange(k_len - q_len, k_len)[:, None]
    j = torch.arange(k_len)[None, :]
    return (j <= p) & (j > p - (window or k_len + 1))


def naive_hybrid(q, k, v, qf, kf, window_factor, window, mask, kv0, z0, scale, sinks=None):
    """Explicit loops over batch rows and queries, with the window / older key sets of the spec; `sinks` [B, Tk]
    bool moves keys from the older set to the window's softmax for good."""
    k_len, q_len, group = k.shape[1], q.shape[1], q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    sinks = torch.zeros_like(mask) if sinks is None else sinks & mask
    rows = []
    for b, (real, sink) in enumerate(zip(mask.tolist(), sinks.tolist())):
        outs = []
        for i in range(q_len):
            p = k_len - q_len + i
            win = [j for j in range(0, p + 1) if real[j] and (j > p - window or sink[j])]
            old = [j for j in range(0, p - window + 1) if real[j] and not sink[j]]
            num = torch.einsum("hf,hfd->hd", qf[b, i], kv0[b])  # [H, Dv]
            den = torch.einsum("hf,hf->h", qf[b, i], z0[b])  # [H]
            if win:
                s = scale * torch.einsum("hd,jhd->hj", q[b, i], k[b, win])
                e = window_factor[:, None] * torch.exp(s - s.max(-1, keepdim=True).values)
                num = num + torch.einsum("hj,jhd->hd", e, v[b, win])
                den = den + e.sum(-1)
            if old:
                a = torch.einsum("hf,jhf->hj", qf[b, i], kf[b, old])
                num = num + torch.einsum("hj,jhd->hd", a, v[b, old])
                den = den + a.sum(-1)
            outs.append(num / den[:, None] if (den > 0).all() else torch.zeros_like(num))
        rows.append(torch.stack(outs))
    n = max(k_len - window + 1, 0)  # keys outside the next query's window
    kf_folded = kf[:, :n] * (mask & ~sinks)[:, :n, None, None]
    return torch.stack(rows), (kv0 + torch.einsum("bjhf,bjhd->bhfd", kf_folded, v[:, :n]), z0 + kf_folded.sum(1))


# --- feature maps -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 4, 16])
def test_taylor_feature_map_kernel_identity(d):
    rand = Rand(d)
    q, k = rand.normal(3, 5, d), rand.normal(3, 5, d)
    phi_q, phi_k = taylor_feature_map(q), taylor_feature_map(k)
    assert phi_q.shape == (3, 5, taylor_num_features(d)) == (3, 5, 1 + d + d * d)
    s = (q * k).sum(-1) / math.sqrt(d)
    close((phi_q * phi_k).sum(-1), 1 + s + s**2 / 2)


def test_hedgehog_feature_map():
    rand = Rand(1)
    x, weight = rand.normal(2, 7, H, D), rand.normal(H, D, FEAT)
    phi = hedgehog_feature_map(x, weight)
    assert phi.shape == (2, 7, H, 2 * FEAT)
    for h in range(H):  # each head uses its own weight
        u = x[:, :, h] @ weight[h]
        close(phi[:, :, h], torch.cat([torch.softmax(u, -1), torch.softmax(-u, -1)], -1))

    # Identity weights: the features are softmax(x) and softmax(-x), each summing to 1 per token.
    identity = torch.eye(D, dtype=torch.float64).expand(H, D, D)
    phi = hedgehog_feature_map(x, identity)
    close(phi[..., :D], torch.softmax(x, -1))
    close(phi.sum(-1), torch.full((2, 7, H), 2.0, dtype=torch.float64))

    # Softmax underflows for large logits; LoLCATs' clamp keeps every feature >= 1e-12.
    assert hedgehog_feature_map(1e4 * x, identity).min() == 1e-12


# --- linear attention ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 16, 64])
@pytest.mark.parametrize("length", LENGTHS)
def test_linear_attention_matches_naive(length, chunk_size):
    rand = Rand(length)
    qf, kf, v = rand.positive(2, length, H, FEAT), rand.positive(2, length, H, FEAT), rand.normal(2, length, H, DV)
    kv0, z0 = rand.normal(2, H, FEAT, DV), rand.positive(2, H, FEAT)
    mask = left_padding_mask(length)
    expected, (kv, z) = naive_linear(qf, kf, v, mask, kv0, z0)
    for op in (partial(linear_attention, chunk_size=chunk_size), linear_attention_recurrent):
        o, state = op(qf, kf, v, key_mask=mask, initial_state=(kv0, z0), output_final_state=True)
        close(o, expected)
        close(state, (kv, z))


@pytest.mark.parametrize("length", LENGTHS)
def test_linear_attention_without_state_or_mask(length):
    rand = Rand(length)
    qf, kf, v = rand.positive(2, length, H, FEAT), rand.positive(2, length, H, FEAT), rand.normal(2, length, H, DV)
    zeros = (torch.zeros(2, H, FEAT, DV, dtype=torch.float64), torch.zeros(2, H, FEAT, dtype=torch.float64))
    expected, _ = naive_linear(qf, kf, v, torch.ones(2, length), *zeros)
    o, state = linear_attention(qf, kf, v, chunk_size=5)
    assert state is None
    close(o, expected)
    close(linear_attention_recurrent(qf, kf, v)[0], expected)


@pytest.mark.parametrize("length", LENGTHS)
def test_taylor_linear_attention_matches_kernel_formula(length):
    """o_t = sum_{j<=t} m_j K(q_t, k_j) v_j / (sum_{j<=t} m_j K(q_t, k_j) + eps), K = 1 + s + s^2/2, s = q.k/sqrt(d)."""
    rand = Rand(length)
    q, k, v = rand.normal(2, length, H, D), rand.normal(2, length, H, D), rand.normal(2, length, H, DV)
    mask = left_padding_mask(length)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    a = (1 + s + s**2 / 2) * torch.ones(length, length).tril() * mask[:, None, None, :]
    expected = torch.einsum("bhij,bjhd->bihd", a, v) / (a.sum(-1).transpose(1, 2)[..., None] + 1e-12)
    for op in (taylor_linear_attention, taylor_linear_attention_recurrent):
        o, (kv, z) = op(q, k, v, key_mask=mask, output_final_state=True)
        close(o, expected)
        assert kv.shape == (2, H, taylor_num_features(D), DV) and z.shape == (2, H, taylor_num_features(D))


@pytest.mark.parametrize(
    "op, dim",
    [
        (partial(linear_attention, chunk_size=8), FEAT),
        (linear_attention_recurrent, FEAT),
        (taylor_linear_attention, D),
        (taylor_linear_attention_recurrent, D),
    ],
)
def test_linear_attention_state_passing(op, dim):
    """Prefill 20 tokens, decode 1, then the rest: equal to one call over the whole sequence."""
    rand, length = Rand(3), 63
    q, k, v = rand.positive(2, length, H, dim), rand.positive(2, length, H, dim), rand.normal(2, length, H, DV)
    mask = left_padding_mask(length)
    whole, whole_state = op(q, k, v, key_mask=mask, output_final_state=True)
    outs, state = [], None
    for a, b in [(0, 20), (20, 21), (21, length)]:
        o, state = op(
            q[:, a:b], k[:, a:b], v[:, a:b], key_mask=mask[:, a:b], initial_state=state, output_final_state=True
        )
        outs.append(o)
    close(torch.cat(outs, 1), whole)
    close(state, whole_state)


def test_linear_attention_left_padding():
    """A left-padded row (garbage at the padded positions) equals the same tokens run alone."""
    rand, length = Rand(4), 30
    q, k, v = rand.normal(2, length, H, D), rand.normal(2, length, H, D), rand.normal(2, length, H, DV)
    mask = left_padding_mask(length)
    real = mask[1]
    for op in (taylor_linear_attention, taylor_linear_attention_recurrent):
        o, (kv, z) = op(q, k, v, key_mask=mask, output_final_state=True)
        alone, (kv_alone, z_alone) = op(q[1:, real], k[1:, real], v[1:, real], output_final_state=True)
        close(o[1:, real], alone)
        close((kv[1:], z[1:]), (kv_alone, z_alone))
        assert o[1, ~real].abs().max() < 1e-6  # no real key yet: 0 / eps


# --- softmax attention --------------------------------------------------------------------------------------------


# Softmax attention's forms: the reference, and the CPU path (torch's fused kernel).
SOFTMAX_FORMS = (softmax_attention_reference, softmax_attention_sdpa)


@pytest.mark.parametrize("softmax_attention", SOFTMAX_FORMS)
@pytest.mark.parametrize("window", [None, 1, 4, 64])
@pytest.mark.parametrize("length", LENGTHS)
def test_softmax_attention_matches_sdpa(length, window, softmax_attention):
    rand = Rand(length)
    q, k, v = rand.normal(B, length, H, D), rand.normal(B, length, HKV, D), rand.normal(B, length, HKV, DV)
    attn_mask = visible_keys(length, length, window)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, enable_gqa=True
    ).transpose(1, 2)
    close(softmax_attention(q, k, v, window=window), expected)


@pytest.mark.parametrize("softmax_attention", SOFTMAX_FORMS)
@pytest.mark.parametrize("window", [None, 3])
def test_softmax_attention_padding_and_scale(window, softmax_attention):
    """Padded keys are invisible; queries with no visible key give 0; a custom scale is applied."""
    rand, length = Rand(5), 9
    q, k, v = rand.normal(2, length, H, D), rand.normal(2, length, HKV, D), rand.normal(2, length, HKV, DV)
    mask = left_padding_mask(length)
    attn_mask = visible_keys(length, length, window) & mask[:, None, None, :]  # [B, 1, Tq, Tk]
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=0.7, enable_gqa=True
    ).transpose(1, 2)
    o = softmax_attention(q, k, v, window=window, key_mask=mask, scale=0.7)
    has_keys = attn_mask.any(-1)[:, 0]  # [B, Tq]
    close(o[has_keys], expected[has_keys])
    assert (~has_keys).any() and (o[~has_keys] == 0).all()

    # The padded row equals its real tokens run alone.
    real = mask[1]
    close(o[1:, real], softmax_attention(q[1:, real], k[1:, real], v[1:, real], window=window, scale=0.7))


@pytest.mark.parametrize("softmax_attention", SOFTMAX_FORMS)
@pytest.mark.parametrize("window", [None, 1, 5])
def test_softmax_attention_cached_prefix(window, softmax_attention):
    """Queries are the last Tq keys: prefill then decode with the cached keys equals one call over everything."""
    rand, length = Rand(6), 40
    q, k, v = rand.normal(B, length, H, D), rand.normal(B, length, HKV, D), rand.normal(B, length, HKV, DV)
    whole = softmax_attention(q, k, v, window=window)
    for a, b in [(0, 17), (17, 18), (18, length)]:
        start = 0 if window is None else max(a - window + 1, 0)  # what a sliding-window cache keeps
        close(softmax_attention(q[:, a:b], k[:, start:b], v[:, start:b], window=window), whole[:, a:b])


def test_softmax_attention_window_one_is_own_value():
    rand = Rand(7)
    q, k, v = rand.normal(B, 6, H, D), rand.normal(B, 6, HKV, D), rand.normal(B, 6, HKV, DV)
    close(softmax_attention(q, k, v, window=1), v.repeat_interleave(H // HKV, 2))


# --- hybrid attention ---------------------------------------------------------------------------------------------


def hybrid_inputs(rand, q_len, k_len, batch=2):
    return dict(
        q=rand.normal(batch, q_len, H, D),
        k=rand.normal(batch, k_len, HKV, D),
        v=rand.normal(batch, k_len, HKV, DV),
        q_feat=rand.positive(batch, q_len, H, FEAT),
        k_feat=rand.positive(batch, k_len, H, FEAT),
        window_factor=rand.positive(H) / 1.2,
    )


@pytest.mark.parametrize("window", [1, 3, 16, 400])
@pytest.mark.parametrize("length", LENGTHS)
def test_hybrid_attention_matches_naive(length, window):
    rand, prefix = Rand(length), 4  # 4 cached keys before the queries
    x = hybrid_inputs(rand, length, length + prefix)
    kv0, z0 = rand.normal(2, H, FEAT, DV), rand.positive(2, H, FEAT)
    mask = left_padding_mask(length + prefix)
    expected, expected_state = naive_hybrid(*x.values(), window, mask, kv0, z0, scale=D**-0.5)
    for op in HYBRID_OPS:
        o, state = op(**x, window=window, key_mask=mask, initial_state=(kv0, z0), output_final_state=True)
        close(o, expected)
        close(state, expected_state)


@pytest.mark.parametrize("length", LENGTHS)
def test_hybrid_attention_all_padded_queries_are_zero(length):
    rand = Rand(length)
    x = hybrid_inputs(rand, length, length)
    mask = left_padding_mask(length)
    zeros = torch.zeros(2, H, FEAT, DV, dtype=torch.float64), torch.zeros(2, H, FEAT, dtype=torch.float64)
    expected, _ = naive_hybrid(*x.values(), 3, mask, *zeros, scale=0.5)
    for op in HYBRID_OPS:
        inputs = {name: t.clone().requires_grad_() for name, t in x.items()}
        o, state = op(**inputs, window=3, key_mask=mask, scale=0.5)
        assert state is None
        close(o, expected)
        assert (o[1, : length - length // 2] == 0).all()
        o.backward(rand.normal(*o.shape))  # padded rows divide 0 by 0: their gradients must stay finite
        assert all(t.grad.isfinite().all() for t in inputs.values())


@pytest.mark.parametrize("op", HYBRID_OPS)
def test_hybrid_attention_wide_window_is_softmax_attention(op):
    """With every key in the window and no state, the window factor cancels in the ratio: plain softmax attention."""
    rand, length = Rand(8), 20
    x = hybrid_inputs(rand, length, length)
    mask = left_padding_mask(length)
    o, _ = op(**x, window=length, key_mask=mask)
    close(o, softmax_attention(x["q"], x["k"], x["v"], key_mask=mask))


@pytest.mark.parametrize("op", HYBRID_OPS)
def test_hybrid_attention_window_one(op):
    """Window 1: y_p = (w v_p + sum_{j<p} a_pj v_j) / (w + sum_{j<p} a_pj), w the window factor,
    a_pj = phi_q(q_p).phi_k(k_j)."""
    rand, length = Rand(9), 12
    x = hybrid_inputs(rand, length, length)
    window_factor = x["window_factor"][:, None]  # [H, 1]
    a = torch.einsum("bihf,bjhf->bhij", x["q_feat"], x["k_feat"]).tril(-1)  # strictly older keys
    v = x["v"].repeat_interleave(H // HKV, 2)
    num = window_factor[..., None] * v.transpose(1, 2) + a @ v.transpose(1, 2)  # [B, H, T, Dv]
    expected = (num / (window_factor + a.sum(-1))[..., None]).transpose(1, 2)
    close(op(**x, window=1)[0], expected)


@pytest.mark.parametrize("window", [1, 4, 30])
@pytest.mark.parametrize("op", HYBRID_OPS)
def test_hybrid_attention_state_passing(op, window):
    """Prefill, decode two tokens, then the rest, each call given the last window - 1 keys and the state, as the
    cache does (starting from a buffer of window - 1 masked slots): equal to one call over the whole sequence."""
    rand, length, slots = Rand(10), 25, window - 1
    x = hybrid_inputs(rand, length, length)
    mask = left_padding_mask(length)
    whole, whole_state = op(**x, window=window, key_mask=mask, output_final_state=True)
    # Keys of the whole run, preceded by the initial buffer of masked garbage slots.
    buffered = {
        name: torch.cat([rand.normal(2, slots, *x[name].shape[2:]), x[name]], 1) for name in ("k", "v", "k_feat")
    }
    buffered_mask = torch.cat([torch.zeros(2, slots, dtype=torch.bool), mask], 1)
    outs, state = [], None
    for a, b in [(0, 11), (11, 12), (12, 13), (13, length)]:
        keys = slice(a, b + slots)  # the buffer (last window - 1 keys) + the new ones
        o, state = op(
            x["q"][:, a:b],
            buffered["k"][:, keys],
            buffered["v"][:, keys],
            x["q_feat"][:, a:b],
            buffered["k_feat"][:, keys],
            x["window_factor"],
            window,
            key_mask=buffered_mask[:, keys],
            initial_state=state,
            output_final_state=True,
        )
        outs.append(o)
    close(torch.cat(outs, 1), whole)
    close(state, whole_state)


def test_hybrid_attention_left_padding():
    rand, length, window = Rand(11), 30, 4
    x = hybrid_inputs(rand, length, length)
    mask = left_padding_mask(length)
    real = mask[1]
    alone = {name: t if name == "window_factor" else t[1:, real] for name, t in x.items()}
    for op in HYBRID_OPS:
        o, (kv, z) = op(**x, window=window, key_mask=mask, output_final_state=True)
        o_alone, (kv_alone, z_alone) = op(**alone, window=window, output_final_state=True)
        close(o[1:, real], o_alone)
        close((kv[1:], z[1:]), (kv_alone, z_alone))


@pytest.mark.parametrize("op", HYBRID_OPS)
def test_hybrid_attention_ignores_the_features_of_the_last_window_keys(op):
    """The last window - 1 keys are in every query's window and the next one's: their features enter neither the
    linear part nor the state (the models map only the keys before them)."""
    rand, length, window = Rand(12), 30, 6
    x = hybrid_inputs(rand, length, length + 3)
    state = rand.normal(2, H, FEAT, DV), rand.positive(2, H, FEAT)
    o, final = op(**x, window=window, initial_state=state, output_final_state=True)
    x["k_feat"][:, -(window - 1) :] = 0
    o_zeroed, final_zeroed = op(**x, window=window, initial_state=state, output_final_state=True)
    close((o_zeroed, *final_zeroed), (o, *final))
    x["k_feat"][:, -window] = 0  # the first key that does count
    assert not torch.allclose(op(**x, window=window, initial_state=state, output_final_state=True)[1][0], final[0])


def first_real_keys(mask, count):
    """[B, Tk] bool: the first `count` real keys of each row (the sinks the models use)."""
    return mask & (mask.cumsum(1) <= count)


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("length", LENGTHS)
def test_hybrid_attention_chunked_gradients_match_the_reference(length, sinks):
    """Blocks of 8 queries over a window of 5 behind 12 cached keys, padded rows, GQA, with and without sinks: the
    outputs, the final state and the gradients of every input equal the reference's."""
    rand, window, prefix = Rand(length + 1), 5, 12
    x = hybrid_inputs(rand, length, length + prefix)
    mask = left_padding_mask(length + prefix)
    state = rand.normal(2, H, FEAT, DV), rand.positive(2, H, FEAT)
    sink_mask = first_real_keys(mask, sinks) if sinks else None

    def outputs_and_grads(op):
        inputs = {name: t.clone().requires_grad_() for name, t in x.items()}
        o, (kv, z) = op(
            **inputs, window=window, key_mask=mask, initial_state=state, output_final_state=True, sink_mask=sink_mask
        )
        loss = sum((out * Rand(i).normal(*out.shape)).sum() for i, out in enumerate((o, kv, z)))
        return (o, kv, z), torch.autograd.grad(loss, list(inputs.values()))

    expected = outputs_and_grads(hybrid_reference.hybrid_attention)
    close(outputs_and_grads(partial(hybrid_attention_chunked, chunk=8)), expected)
    close(
        outputs_and_grads(partial(hybrid_attention_chunked, chunk=8, max_scores=3000)), expected
    )  # 2-3 blocks a group


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("window", [1, 3, 16])
@pytest.mark.parametrize("length", LENGTHS)
def test_hybrid_decode_step_without_features_runs_sdpa_on_cpu(length, window, sinks):
    """A decode step without a linear term (F = 0) on the CPU: softmax over the window and the sinks through SDPA,
    padded rows, GQA. Its output, empty state and gradients equal the reference's; the dispatched op takes it."""
    rand = Rand(length + window)
    x = hybrid_inputs(rand, 1, length)
    x["q_feat"], x["k_feat"] = x["q_feat"][..., :0], x["k_feat"][..., :0]
    mask = left_padding_mask(length)
    state = x["q"].new_zeros(2, H, 0, DV), x["q"].new_zeros(2, H, 0)
    kwargs = dict(window=window, key_mask=mask, initial_state=state, output_final_state=True)
    if sinks:
        kwargs["sink_mask"] = first_real_keys(mask, sinks)

    def outputs_and_grads(op):
        inputs = {name: t.clone().requires_grad_(name in ("q", "k", "v")) for name, t in x.items()}
        o, final = op(**inputs, **kwargs)
        grads = torch.autograd.grad((o * Rand(7).normal(*o.shape)).sum(), [inputs[n] for n in ("q", "k", "v")])
        return (o, *final), grads

    expected = outputs_and_grads(hybrid_reference.hybrid_attention_recurrent)
    close(outputs_and_grads(hybrid_attention_recurrent_cpu), expected)
    with patch.object(chunked, "sdpa_over", wraps=sdpa_over) as sdpa:
        close(outputs_and_grads(hybrid_attention_recurrent), expected)
    assert sdpa.call_count == 1


@pytest.mark.parametrize("window", [1, 3, 16])
@pytest.mark.parametrize("length", LENGTHS)
def test_hybrid_attention_sinks_match_naive(length, window):
    """Sinks among cached and new keys, padded rows, GQA: every op's outputs and state equal the spec's, and the
    sinks change the result wherever a sink is older than a window (so the test can fail)."""
    rand, prefix = Rand(length + 2), 4
    x = hybrid_inputs(rand, length, length + prefix)
    kv0, z0 = rand.normal(2, H, FEAT, DV), rand.positive(2, H, FEAT)
    mask = left_padding_mask(length + prefix)
    sinks = first_real_keys(mask, 3)
    sinks[0, -1] = True  # a sink that no query sees beyond its window
    expected, expected_state = naive_hybrid(*x.values(), window, mask, kv0, z0, D**-0.5, sinks)
    without, _ = naive_hybrid(*x.values(), window, mask, kv0, z0, D**-0.5)
    assert not torch.allclose(expected, without) or length + prefix <= window
    for op in HYBRID_OPS:
        o, state = op(
            **x, window=window, key_mask=mask, initial_state=(kv0, z0), output_final_state=True, sink_mask=sinks
        )
        close(o, expected)
        close(state, expected_state)


@pytest.mark.parametrize("length, count", [(1, 1), (7, 3), (63, 64), (300, 64)])
def test_first_positions_are_each_rows_first_true_entries(length, count):
    """Rows with more, fewer and no True entries than `count`: the positions of the first `count` in order, marked
    taken; the rest (up to count, or the row's length if shorter) marked not taken, at valid positions (the slots
    and sink lists gather there)."""
    mask = torch.rand(4, length, generator=torch.Generator().manual_seed(length)) < 0.3
    mask[1], mask[2, : length // 2] = False, True
    positions, taken = chunked.first_positions(mask, count)
    width = min(count, length)
    for row, pos, took in zip(mask, positions, taken):
        expected = row.nonzero().flatten()[:count].tolist()
        assert pos[: len(expected)].tolist() == expected
        assert took.tolist() == [True] * len(expected) + [False] * (width - len(expected))
    assert positions.shape == (4, width) and 0 <= positions.min() and positions.max() < length


@pytest.mark.parametrize("late", [1, 5, 400])
@pytest.mark.parametrize("length", LENGTHS)
def test_hybrid_attention_late_sinks_match_naive(length, late):
    """Late sinks (the keys that the last `late` queries see instead of the sinks, as after a new choice of retrieval
    keys), padded rows, GQA, a state: each row's output is the spec's with its own sinks, the final state leaves out
    the late sinks; the blockwise forms and the dispatched CPU path agree, with gradients; and the late rows differ
    from those without late sinks (so the test can fail)."""
    rand, window, prefix = Rand(length + late), 3, 12
    x = hybrid_inputs(rand, length, length + prefix)
    kv0, z0 = rand.normal(2, H, FEAT, DV), rand.positive(2, H, FEAT)
    mask = left_padding_mask(length + prefix)
    sinks = first_real_keys(mask, 2)
    late_sinks = sinks | (torch.arange(length + prefix) % 4 == 1)  # the sinks and scattered "retrieved" keys
    first_late = max(length - late, 0)
    early, _ = naive_hybrid(*x.values(), window, mask, kv0, z0, D**-0.5, sinks)
    later, expected_state = naive_hybrid(*x.values(), window, mask, kv0, z0, D**-0.5, late_sinks)
    expected = torch.cat([early[:, :first_late], later[:, first_late:]], 1)
    if length + prefix > window + 1:
        assert not torch.allclose(later[:, first_late:], early[:, first_late:])
    kwargs = dict(window=window, key_mask=mask, initial_state=(kv0, z0), output_final_state=True, sink_mask=sinks)
    late_kwargs = dict(late_sink_mask=late_sinks, late_queries=late, max_late_sinks=int(late_sinks.sum(1).max()))

    def outputs_and_grads(op):
        inputs = {name: t.clone().requires_grad_() for name, t in x.items()}
        o, (kv, z) = op(**inputs, **kwargs, **late_kwargs)
        loss = sum((out * Rand(i).normal(*out.shape)).sum() for i, out in enumerate((o, kv, z)))
        return (o, kv, z), torch.autograd.grad(loss, list(inputs.values()))

    reference = outputs_and_grads(hybrid_reference.hybrid_attention)
    close(reference[0], (expected, *expected_state))
    for op in (*HYBRID_PARALLEL[1:], hybrid_attention):
        close(outputs_and_grads(op), reference)


def listed_positions(mask, rand):
    """mask [B, T]'s keys by position, shuffled, with empty slots (-1 and T + 2) among them."""
    rows = [row.nonzero().flatten().tolist() + [-1, row.shape[0] + 2] for row in mask]
    width = max(map(len, rows))
    index = torch.tensor([row + [-1] * (width - len(row)) for row in rows])
    return index[:, torch.argsort(rand.normal(width))]


@pytest.mark.parametrize("features", [0, FEAT])
@pytest.mark.parametrize("length", LENGTHS)
def test_hybrid_sinks_by_position_are_the_masks(length, features):
    """Sinks and late sinks given by position (shuffled, with empty slots and the padded keys listed, which are no
    sinks as in a mask): every parallel form and the CPU path give the outputs, state and gradients of the masks."""
    rand, window, prefix, late = Rand(length + features + 4), 3, 12, 5
    x = hybrid_inputs(rand, length, length + prefix)
    x["q_feat"], x["k_feat"] = x["q_feat"][..., :features], x["k_feat"][..., :features]
    state = rand.normal(2, H, features, DV), rand.positive(2, H, features)
    mask = left_padding_mask(length + prefix)
    sinks = first_real_keys(mask, 2)
    late_sinks = sinks | (mask & (torch.arange(length + prefix) % 4 == 1))
    assert torch.equal(index_mask(listed_positions(late_sinks, rand), length + prefix), late_sinks)
    common = dict(window=window, key_mask=mask, initial_state=state, output_final_state=True, late_queries=late)
    by_mask = dict(sink_mask=sinks, late_sink_mask=late_sinks)
    by_position = dict(
        sink_index=listed_positions(sinks | ~mask, rand), late_sink_index=listed_positions(late_sinks, rand)
    )

    def outputs_and_grads(op, sinks):
        inputs = {name: t.clone().requires_grad_() for name, t in x.items()}
        o, final = op(**inputs, **common, **sinks)
        loss = sum((out * Rand(i).normal(*out.shape)).sum() for i, out in enumerate((o, *final)))
        return (o, *final), torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)

    expected = outputs_and_grads(hybrid_reference.hybrid_attention, by_mask)
    for op in (*HYBRID_PARALLEL, hybrid_attention):
        close(outputs_and_grads(op, by_position), expected)
    with torch.no_grad():  # the CPU path without gradients (through SDPA when F = 0)
        close(
            hybrid_attention(**x, **common, **by_position), hybrid_reference.hybrid_attention(**x, **common, **by_mask)
        )


def test_hybrid_sinks_by_position_reject_a_mask_beside_them_and_non_integers():
    x = hybrid_inputs(Rand(3), 4, 4)
    sinks = torch.ones(2, 4, dtype=torch.bool)
    for op in (hybrid_reference.hybrid_attention, hybrid_attention):
        with pytest.raises(ValueError, match="sink_index and sink_mask are exclusive"):
            op(**x, window=2, sink_mask=sinks, sink_index=torch.zeros(2, 1, dtype=torch.long))
        with pytest.raises(TypeError, match="late_sink_index must hold integer key positions, got torch.float32"):
            op(**x, window=2, late_sink_index=torch.zeros(2, 1), late_queries=1)
        with pytest.raises(ValueError, match="late_queries"):
            op(**x, window=2, late_sink_index=torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("late", [0, 5])
@pytest.mark.parametrize("length", LENGTHS)
def test_hybrid_prefill_without_features_runs_sdpa_on_cpu(length, late):
    """The CPU path without a linear term (F = 0) and without gradients, as a converted model's prefill: softmax over
    each query's window and sinks (and the late queries' own sinks) through SDPA, padded rows, GQA, cached keys: the
    reference's output and empty state. With gradients it takes the reference's forms."""
    rand, window, prefix = Rand(length + late + 3), 3, 12
    x = hybrid_inputs(rand, length, length + prefix)
    x["q_feat"], x["k_feat"] = x["q_feat"][..., :0], x["k_feat"][..., :0]
    mask = left_padding_mask(length + prefix)
    state = x["q"].new_zeros(2, H, 0, DV), x["q"].new_zeros(2, H, 0)
    kwargs = dict(window=window, key_mask=mask, initial_state=state, output_final_state=True)
    kwargs["sink_mask"] = first_real_keys(mask, 2)
    if late:
        kwargs |= dict(late_sink_mask=kwargs["sink_mask"] | (torch.arange(length + prefix) % 4 == 1), late_queries=late)
    expected = hybrid_reference.hybrid_attention(**x, **kwargs)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), patch.object(chunked, "sdpa_over", wraps=sdpa_over) as sdpa:
            inputs = {name: t.clone().requires_grad_(grad) for name, t in x.items()}
            o, final = chunked.hybrid_attention_cpu(**inputs, **kwargs)
        assert (sdpa.call_count > 0) == (not grad)
        close((o, *final), (expected[0], *expected[1]))


@pytest.mark.parametrize("block, window", [(1, 3), (4, 10), (5, 3), (64, 3)])
@pytest.mark.parametrize("length", LENGTHS)
def test_window_and_sinks_sdpa_in_blocks_is_the_reference(length, block, window):
    """The CPU prefill without a linear term in blocks of queries (one query a block, blocks shorter than the
    window, late queries starting inside a block): the reference's outputs, with sinks, late sinks, padding, GQA
    and cached keys."""
    rand, prefix = Rand(length + block + window), 12
    x = hybrid_inputs(rand, length, length + prefix)
    x["q_feat"], x["k_feat"] = x["q_feat"][..., :0], x["k_feat"][..., :0]
    mask = left_padding_mask(length + prefix)
    sinks = first_real_keys(mask, 2)
    for late in (0, 5):
        kwargs = dict(window=window, key_mask=mask, sink_mask=sinks)
        if late:
            kwargs |= dict(late_sink_mask=sinks | (torch.arange(length + prefix) % 4 == 1), late_queries=late)
        o, _ = chunked.window_and_sinks_sdpa(**x, **kwargs, block=block)
        close(o, hybrid_reference.hybrid_attention(**x, **kwargs)[0])


def test_cpu_inputs_go_to_the_cpu_path_unless_the_reference_is_asked_for(monkeypatch):
    calls = []
    op = dispatch.dispatched(lambda x: calls.append("reference"), lambda: None, cpu=lambda x: calls.append("cpu"))
    op(torch.ones(2))
    monkeypatch.setenv("HF_BASED_KERNELS", "reference")
    op(torch.ones(2))
    assert calls == ["cpu", "reference"]
    assert hybrid_attention.reference is hybrid_reference.hybrid_attention


def test_hybrid_attention_on_the_cpu_is_blockwise_beyond_twice_chunk_plus_window(monkeypatch):
    from hf_based.kernels.hybrid import chunked

    monkeypatch.setattr(chunked, "hybrid_attention", lambda q, k, *args, **kwargs: "reference")
    monkeypatch.setattr(chunked, "hybrid_attention_chunked", lambda q, k, *args, **kwargs: "blockwise")
    x = hybrid_inputs(Rand(17), 1, 2 * (chunked.CHUNK + 3) + 1, batch=1)
    assert chunked.hybrid_attention_cpu(**x, window=3) == "blockwise"
    x["k"] = x["k"][:, 1:]  # the other inputs' lengths do not enter the choice
    assert chunked.hybrid_attention_cpu(**x, window=3) == "reference"


# --- short convolution --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
@pytest.mark.parametrize("length", LENGTHS)
def test_short_conv_matches_conv1d(length, kernel_size):
    rand, channels = Rand(length), 6
    x, weight, bias = rand.normal(B, length, channels), rand.normal(channels, kernel_size), rand.normal(channels)
    conv = torch.nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1).double()
    with torch.no_grad():
        conv.weight.copy_(weight[:, None, :])
        conv.bias.copy_(bias)
        expected = conv(x.transpose(1, 2))[..., :length].transpose(1, 2)
    for op in (short_conv, short_conv_recurrent):
        y, state = op(x, weight, bias, output_final_state=True)
        close(y, expected)
        padded = torch.cat([torch.zeros(B, kernel_size - 1, channels, dtype=torch.float64), x], 1)
        close(state, padded[:, padded.shape[1] - (kernel_size - 1) :])


@pytest.mark.parametrize("op", [short_conv, short_conv_recurrent])
def test_short_conv_state_passing(op):
    rand, length, channels = Rand(12), 20, 6
    x, weight = rand.normal(B, length, channels), rand.normal(channels, 4)
    whole, whole_state = op(x, weight, output_final_state=True)
    outs, state = [], None
    for a, b in [(0, 2), (2, 3), (3, length)]:  # the first chunk is shorter than the K - 1 = 3 state
        y, state = op(x[:, a:b], weight, initial_state=state, output_final_state=True)
        outs.append(y)
    close(torch.cat(outs, 1), whole)
    close(state, whole_state)
    close(whole_state, x[:, -3:])


# --- gradients ----------------------------------------------------------------------------------------------------


def flat(result):
    """(o, (kv, z)) -> (o, kv, z); (y, state) -> (y, state)."""
    o, state = result
    return (o, *state) if isinstance(state, tuple) else (o, state)


def grad_cases():
    """name -> (function of fp64 tensors returning a tuple of tensors, inputs); tiny sizes keep gradcheck fast."""
    rand = Rand(13)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    # q, k features [2, 5, 2, 3], v [2, 5, 2, 2], kv [2, 2, 3, 2], z [2, 2, 3]
    lin = [
        rand.positive(2, 5, 2, 3),
        rand.positive(2, 5, 2, 3),
        rand.normal(2, 5, 2, 2),
        rand.normal(2, 2, 3, 2),
        rand.positive(2, 2, 3),
    ]
    # raw q, k [2, 5, 2, 2] -> Taylor features of size 7
    raw = [
        rand.normal(2, 5, 2, 2),
        rand.normal(2, 5, 2, 2),
        rand.normal(2, 5, 2, 2),
        rand.normal(2, 2, 7, 2),
        rand.positive(2, 2, 7),
    ]
    # 3 queries over 5 keys, 2 query heads sharing 1 kv head; in row 1 the first query (window 2) sees no key
    hyb = [
        rand.normal(2, 3, 2, 2),
        rand.normal(2, 5, 1, 2),
        rand.normal(2, 5, 1, 2),
        rand.positive(2, 3, 2, 2),
        rand.positive(2, 5, 2, 2),
        rand.positive(2),
        rand.normal(2, 2, 2, 2),
        rand.positive(2, 2, 2),
    ]
    hyb_mask = torch.tensor([[True] * 5, [False, False, False, True, True]])
    conv = [rand.normal(2, 5, 3), rand.normal(3, 3), rand.normal(3), rand.normal(2, 2, 3)]

    def linear_case(op, **kw):
        return lambda q, k, v, kv, z: flat(
            op(q, k, v, key_mask=mask, initial_state=(kv, z), output_final_state=True, **kw)
        )

    def hybrid_case(op, window):
        return lambda q, k, v, qf, kf, g, kv, z: flat(
            op(q, k, v, qf, kf, g, window, key_mask=hyb_mask, initial_state=(kv, z), output_final_state=True)
        )

    def conv_case(op):
        return lambda x, w, b, s: flat(op(x, w, b, initial_state=s, output_final_state=True))

    return {
        "taylor_feature_map": (taylor_feature_map, [rand.normal(2, 3)]),
        "hedgehog_feature_map": (hedgehog_feature_map, [rand.normal(1, 2, 2, 3), rand.normal(2, 3, 2)]),
        "linear_attention": (linear_case(linear_attention, chunk_size=2), lin),
        "linear_attention_recurrent": (linear_case(linear_attention_recurrent), lin),
        "taylor_linear_attention": (linear_case(taylor_linear_attention), raw),
        "taylor_linear_attention_recurrent": (linear_case(taylor_linear_attention_recurrent), raw),
        "softmax_attention": (lambda q, k, v: softmax_attention(q, k, v, window=2, key_mask=hyb_mask), hyb[:3]),
        "hybrid_attention": (hybrid_case(hybrid_reference.hybrid_attention, 2), hyb),
        "hybrid_attention_chunked": (hybrid_case(partial(hybrid_attention_chunked, chunk=2), 2), hyb),
        "hybrid_attention_recurrent": (hybrid_case(hybrid_attention_recurrent, 2), hyb),
        "short_conv": (conv_case(short_conv), conv),
        "short_conv_recurrent": (conv_case(short_conv_recurrent), conv),
    }


GRAD_CASES = grad_cases()


@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradcheck(name):
    fn, inputs = GRAD_CASES[name]
    inputs = [x.clone().requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize(
    "parallel, recurrent",
    [
        ("linear_attention", "linear_attention_recurrent"),
        ("taylor_linear_attention", "taylor_linear_attention_recurrent"),
        ("hybrid_attention", "hybrid_attention_recurrent"),
        ("hybrid_attention_chunked", "hybrid_attention_recurrent"),
        ("short_conv", "short_conv_recurrent"),
    ],
)
def test_parallel_and_recurrent_gradients_match(parallel, recurrent):
    def grads(name):
        fn, inputs = GRAD_CASES[name]
        inputs = [x.clone().requires_grad_() for x in inputs]
        # The same random projection of every output (o and the final state) on both sides.
        loss = sum((out * Rand(i).normal(*out.shape)).sum() for i, out in enumerate(fn(*inputs)))
        return torch.autograd.grad(loss, inputs)

    close(grads(parallel), grads(recurrent))


# --- dtypes -------------------------------------------------------------------------------------------------------


def dtype_cases():
    rand = Rand(15)
    q, k, v = rand.normal(2, 9, H, D), rand.normal(2, 9, HKV, D), rand.normal(2, 9, HKV, DV)
    qf, kf = rand.positive(2, 9, H, FEAT), rand.positive(2, 9, H, FEAT)
    vh = rand.normal(2, 9, H, DV)
    window_factor = rand.positive(H) / 1.2
    mask = left_padding_mask(9)
    return {
        "linear_attention": (
            lambda qf, kf, v: linear_attention(qf, kf, v, mask, output_final_state=True, chunk_size=4),
            [qf, kf, vh],
        ),
        "linear_attention_recurrent": (
            lambda qf, kf, v: linear_attention_recurrent(qf, kf, v, mask, None, True),
            [qf, kf, vh],
        ),
        "taylor_linear_attention": (
            lambda q, k, v: taylor_linear_attention(q, k, v, mask, None, True),
            [q, q.flip(1), vh],
        ),
        "taylor_linear_attention_recurrent": (
            lambda q, k, v: taylor_linear_attention_recurrent(q, k, v, mask, None, True),
            [q, q.flip(1), vh],
        ),
        "softmax_attention": (lambda q, k, v: (softmax_attention(q, k, v, window=3, key_mask=mask), None), [q, k, v]),
        "hybrid_attention": (
            lambda q, k, v, qf, kf: hybrid_attention(q, k, v, qf, kf, window_factor, 3, mask, output_final_state=True),
            [q, k, v, qf, kf],
        ),
        "hybrid_attention_recurrent": (
            lambda q, k, v, qf, kf: hybrid_attention_recurrent(q, k, v, qf, kf, window_factor, 3, mask, None, True),
            [q, k, v, qf, kf],
        ),
        "hybrid_attention_chunked": (
            lambda q, k, v, qf, kf: hybrid_attention_chunked(
                q, k, v, qf, kf, window_factor, 3, mask, None, True, chunk=2
            ),
            [q, k, v, qf, kf],
        ),
        "short_conv": (lambda x, w: short_conv(x, w, output_final_state=True), [vh.flatten(2), rand.normal(20, 4)]),
        "short_conv_recurrent": (
            lambda x, w: short_conv_recurrent(x, w, output_final_state=True),
            [vh.flatten(2), rand.normal(20, 4)],
        ),
        "hedgehog_feature_map": (lambda x, w: (hedgehog_feature_map(x, w), None), [q, rand.normal(H, D, FEAT)]),
    }


DTYPE_CASES = dtype_cases()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("name", DTYPE_CASES)
def test_low_precision_inputs(name, dtype, tol):
    """Outputs come back in the input dtype, states in fp32, and the math runs in fp32: the only error left is
    the rounding of the output."""
    fn, inputs = DTYPE_CASES[name]
    inputs = [x.to(dtype) for x in inputs]
    out, state = fn(*inputs)
    reference, reference_state = fn(*[x.double() for x in inputs])
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference, rtol=tol, atol=tol)
    if state is not None:
        states = state if isinstance(state, tuple) else (state,)
        assert all(s.dtype == torch.float32 for s in states)
        reference_states = reference_state if isinstance(reference_state, tuple) else (reference_state,)
        torch.testing.assert_close([s.double() for s in states], list(reference_states), rtol=1e-5, atol=1e-5)


def test_fp64_stays_fp64():
    rand = Rand(16)
    x = hybrid_inputs(rand, 5, 5)
    o, (kv, z) = hybrid_attention(**x, window=2, output_final_state=True)
    assert o.dtype == kv.dtype == z.dtype == torch.float64


# --- validation ---------------------------------------------------------------------------------------------------


def t(*shape):
    return torch.ones(*shape)


BAD_INPUTS = [
    (
        lambda: linear_attention(t(2, 3, 4), t(2, 3, 4), t(2, 3, 4)),
        r"q must have shape \[batch, time, heads, features\], got \(2, 3, 4\)",
    ),
    (
        lambda: linear_attention(t(2, 3, 4, 5), t(2, 3, 3, 5), t(2, 3, 4, 6)),
        r"k must have shape \[batch, time, heads, features\] = \[2, 3, 4, 5\], got \(2, 3, 3, 5\)",
    ),
    (
        lambda: linear_attention(
            t(2, 3, 4, 5), t(2, 3, 4, 5), t(2, 3, 4, 6), initial_state=(t(2, 4, 5, 7), t(2, 4, 5))
        ),
        r"initial_state kv must have shape \[batch, heads, features, value_dim\] = \[2, 4, 5, 6\], got \(2, 4, 5, 7\)",
    ),
    (
        lambda: linear_attention(t(2, 3, 4, 5), t(2, 3, 4, 5), t(2, 3, 4, 6), initial_state=t(2, 4, 5, 6)),
        r"initial_state must be a \(kv, z\) tuple of tensors, got Tensor",
    ),
    (
        lambda: linear_attention(t(2, 3, 4, 5), t(2, 3, 4, 5), t(2, 3, 4, 6), chunk_size=0),
        r"chunk_size must be an int >= 1, got 0",
    ),
    (
        lambda: linear_attention_recurrent(t(2, 3, 4, 5), t(2, 3, 4, 5), t(2, 3, 4, 6), key_mask=t(2, 4)),
        r"key_mask must have shape \[batch, time\] = \[2, 3\], got \(2, 4\)",
    ),
    (
        lambda: taylor_linear_attention(t(2, 3, 4, 5), t(2, 3, 4, 6), t(2, 3, 4, 6)),
        r"k must have shape \[batch, time, heads, dim\] = \[\*, \*, \*, 5\], got \(2, 3, 4, 6\)",
    ),
    (
        lambda: softmax_attention(t(2, 5, 4, 8), t(2, 5, 3, 8), t(2, 5, 3, 8)),
        r"k must have a number of heads that divides q's 4 heads, got \(2, 5, 3, 8\)",
    ),
    (
        lambda: softmax_attention(t(2, 5, 4, 8), t(2, 4, 2, 8), t(2, 4, 2, 8)),
        r"k must have at least as many time steps as q \(5\).*got \(2, 4, 2, 8\)",
    ),
    (
        lambda: softmax_attention(t(2, 5, 4, 8), t(2, 5, 2, 8), t(2, 5, 2, 8), window=0),
        r"window must be an int >= 1 .*got 0",
    ),
    (
        lambda: softmax_attention(t(2, 5, 4, 8), t(2, 5, 2, 8), t(2, 5, 2, 8), window=2.5),
        r"window must be an int >= 1 .*got 2.5",
    ),
    (
        lambda: softmax_attention(t(2, 5, 4, 8), t(2, 5, 2, 8), t(2, 5, 1, 8)),
        r"v must have shape \[batch, time, kv_heads, value_dim\] = \[2, 5, 2, \*\], got \(2, 5, 1, 8\)",
    ),
    (
        lambda: hybrid_attention(t(2, 5, 4, 8), t(2, 5, 2, 8), t(2, 5, 2, 8), t(2, 5, 4, 3), t(2, 5, 4, 3), t(4), -1),
        r"window must be an int >= 1 .*got -1",
    ),
    (
        lambda: hybrid_attention(t(2, 5, 4, 8), t(2, 5, 2, 8), t(2, 5, 2, 8), t(2, 5, 4, 3), t(2, 5, 4, 2), t(4), 2),
        r"k_feat must have shape \[batch, time, heads, features\] = \[2, 5, 4, 3\], got \(2, 5, 4, 2\)",
    ),
    (
        lambda: hybrid_attention(t(2, 5, 4, 8), t(2, 5, 2, 8), t(2, 5, 2, 8), t(2, 5, 4, 3), t(2, 5, 4, 3), t(2), 2),
        r"window_factor must have shape \[heads\] = \[4\], got \(2,\)",
    ),
    (
        lambda: hybrid_attention_recurrent(
            t(2, 5, 4, 8),
            t(2, 5, 2, 8),
            t(2, 5, 2, 8),
            t(2, 5, 4, 3),
            t(2, 5, 4, 3),
            t(4),
            2,
            initial_state=(t(2, 4, 3, 8), t(2, 2, 3)),
        ),
        r"initial_state z must have shape \[batch, heads, features\] = \[2, 4, 3\], got \(2, 2, 3\)",
    ),
    (
        lambda: short_conv(t(2, 5, 6), t(5, 4)),
        r"weight must have shape \[channels, kernel_size\] = \[6, \*\], got \(5, 4\)",
    ),
    (
        lambda: short_conv_recurrent(t(2, 5, 6), t(6, 4), initial_state=t(2, 4, 6)),
        r"initial_state must have shape \[batch, kernel_size - 1, channels\] = \[2, 3, 6\], got \(2, 4, 6\)",
    ),
    (lambda: short_conv(t(2, 5, 6, 1), t(6, 4)), r"x must have shape \[batch, time, channels\], got \(2, 5, 6, 1\)"),
    (
        lambda: hedgehog_feature_map(t(2, 5, 4, 8), t(4, 7, 3)),
        r"weight must have shape \[heads, dim, feature_dim\] = \[4, 8, \*\], got \(4, 7, 3\)",
    ),
]


@pytest.mark.parametrize("call, message", BAD_INPUTS)
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_retrieval_pooling_ranks_the_keys_around_a_scoring_one_with_it():
    # One key scores in each row: the KEPT_BEFORE keys before it and the KEPT_AFTER after it take its score (cut at the
    # ends), every other key keeps zero.
    weights = torch.zeros(3, 40, dtype=torch.float64)
    weights[0, 20], weights[1, 1], weights[2, 38] = 1.0, 0.5, 0.25
    pooled = pool_neighbours(weights)
    for row, hit in enumerate((20, 1, 38)):
        expected = torch.zeros(40, dtype=torch.float64)
        expected[max(hit - KEPT_BEFORE, 0) : hit + KEPT_AFTER + 1] = weights[row, hit]
        torch.testing.assert_close(pooled[row], expected, rtol=0, atol=0)


def test_retrieval_scores_take_each_keys_best_weight_among_the_queries():
    # Per head, a key's score is the largest softmax weight any query gives it (not their sum), then the heads add up:
    # with the pooling off, the reference matches that formula on causal queries over left-padded keys.
    gen = torch.Generator().manual_seed(7)
    q, k = (torch.randn(2, n, h, 8, generator=gen, dtype=torch.float64) for n, h in ((5, 4), (30, 2)))
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :6] = False
    expected = torch.zeros(2, 30, dtype=torch.float64)
    for b in range(2):
        for h in range(4):
            weights = []
            for i in range(5):  # query i sits at key position 25 + i
                visible = mask[b] & (torch.arange(30) <= 25 + i)
                logits = (k[b, :, h // 2] @ q[b, i, h]) / 8**0.5
                weights.append(logits.masked_fill(~visible, -torch.inf).softmax(0))
            expected[b] += torch.stack(weights).amax(0)
    with patch.object(retrieval_reference, "pool_neighbours", lambda w: w):
        scores = retrieval_reference.retrieval_scores(q, k, mask)
    torch.testing.assert_close(scores, expected)
