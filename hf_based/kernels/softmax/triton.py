"""Triton sliding-window softmax attention (FlashAttention-2) for [batch, time, heads, dim] tensors.

Same signature and semantics as the reference `softmax_attention` (hf_based/kernels/softmax/reference.py): the Tq
queries are the last Tq of the Tk keys (query i sits at key position p = Tk - Tq + i), query head h reads kv head
h // (H // Hkv), the output comes back in v.dtype.

An online softmax over the key blocks that hold a query block's window, so a sliding window costs O(T * window); the
backward recomputes the probabilities from the saved log-sum-exp, dq per query block and dk/dv per key block. The
window tiles (`softmax_fwd_tiles`, `softmax_bwd_dq_tiles`, `softmax_bwd_dkv_tiles`) also make the softmax part of the
hybrid attention kernels (hf_based/kernels/hybrid/triton.py).
"""

import functools

import torch
import triton
import triton.language as tl

from hf_based.kernels._checks import check_attention_inputs, check_window, kernel_dtype
from hf_based.kernels.softmax.reference import softmax_attention as softmax_attention_reference
from hf_based.kernels.triton_utils import block_size, bth_strides, cdiv, dot_precision, kernel_layout, unit_last_dim

# Block sizes (powers of 2, >= 16). Tests shrink them so that small problems cover several blocks.
BLOCK_M = 64  # sliding window: queries per program
BLOCK_M_FULL = 128  # full causal or window > SPLIT_WINDOW: queries per program
BLOCK_N = 64  # keys per tile
NUM_STAGES = 2  # software pipelining depth of the key/query loops
SPLIT_WINDOW = 256  # larger windows (and None) loop apart over the tiles that need no causal/window mask
SPLIT_MIN_TILES = 4  # flash-decoding: key tiles per program at least

LOG2E = 1.4426950408889634  # log2(e): the kernels keep logits in base 2 for exp2
NEG_BIG = tl.constexpr(-1.0e30)  # running max of a row without visible keys: exp2(-inf - NEG_BIG) = 0, never NaN


# --- window tiles, shared with the hybrid kernels ---------------------------------------------------------------------


@triton.jit
def visible(p, j, window, WINDOW: tl.constexpr):
    """Query positions p and key positions j, broadcast against each other: causal, and inside the window."""
    vis = j <= p
    if WINDOW:
        vis = vis & (j > p - window)
    return vis


@triton.jit
def load_key_mask(M, j, Tk):
    """key_mask of keys j (0 = padding); keys outside [0, Tk) count as padding."""
    return tl.load(M + j, mask=(j >= 0) & (j < Tk), other=0) != 0


@triton.jit
def key_blocks(p_min, p_max, window, BN: tl.constexpr, WINDOW: tl.constexpr, SPLIT: tl.constexpr):
    """Key tiles of the queries at positions [p_min, p_max]: n tiles of BN keys from `start`; with SPLIT, tiles
    [lo, hi) are visible to every one of them and skip the causal/window mask (else lo = hi = n: one masked loop)."""
    if WINDOW:
        start = tl.maximum(p_min - window + 1, 0)
        lo = tl.cdiv(tl.maximum(p_max - window + 1 - start, 0), BN)
    else:
        start = p_min * 0
        lo = p_min * 0
    n = tl.cdiv(p_max + 1 - start, BN)
    hi = tl.maximum((p_min + 1 - start) // BN, lo)
    if not SPLIT:
        lo = n
        hi = n
    return start, n, lo, hi


@triton.jit
def query_blocks(n0, off, Tq, window, BN: tl.constexpr, BM: tl.constexpr, WINDOW: tl.constexpr, SPLIT: tl.constexpr):
    """Query tiles that see keys [n0, n0 + BN): n tiles of BM queries from query index `start`; with SPLIT, tiles
    [lo, hi) see all of these keys and skip the causal/window mask (else lo = hi = n: one masked loop)."""
    start = tl.maximum(n0 - off, 0)
    if WINDOW:
        end = tl.minimum(n0 + BN - 1 + window - off, Tq)
    else:
        end = Tq + n0 * 0
    n = tl.cdiv(tl.maximum(end - start, 0), BM)
    lo = tl.minimum(tl.cdiv(tl.maximum(n0 + BN - 1 - off - start, 0), BM), n)
    if WINDOW:
        hi = tl.minimum(tl.maximum(tl.maximum(n0 + window - off - start, 0) // BM, lo), n)
    else:
        hi = n
    if not SPLIT:
        lo = n
        hi = n
    return start, n, lo, hi


@triton.jit
def softmax_fwd_tiles(
    acc, l_i, m_i, idx, q, p, K, V, M, stride_kt, stride_vt, Tk, D, Dv, start, t_lo, t_hi, window, qk_scale,
    BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK: tl.constexpr, ARGMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax of queries q [BM, BD] at positions p over key tiles [t_lo, t_hi) of BN keys from `start`.

    acc [BM, BV] and l_i [BM] are relative to m_i, the running max logit (base 2); ARGMAX keeps its key in idx.
    MASK applies the causal/window mask (tiles at the window's edges).
    """
    d = tl.arange(0, BD)
    e = tl.arange(0, BV)
    for t in range(t_lo, t_hi):
        j = start + t * BN + tl.arange(0, BN)
        k = tl.load(K + j[:, None] * stride_kt + d[None, :], mask=(j[:, None] < Tk) & (d[None, :] < D), other=0.0)
        v = tl.load(V + j[:, None] * stride_vt + e[None, :], mask=(j[:, None] < Tk) & (e[None, :] < Dv), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
        if MASK:
            s = tl.where(visible(p[:, None], j[None, :], window, WINDOW), s, float("-inf"))
        if HAS_MASK:
            s = tl.where(load_key_mask(M, j, Tk)[None, :], s, float("-inf"))
        if ARGMAX:
            idx = tl.where(tl.max(s, 1) > m_i, start + t * BN + tl.argmax(s, 1), idx)
        acc, l_i, m_i = online_softmax_tile(acc, l_i, m_i, s, v, DOT_PRECISION)
    return acc, l_i, m_i, idx


@triton.jit
def online_softmax_tile(acc, l_i, m_i, s, v, DOT_PRECISION: tl.constexpr):
    """One tile of online softmax: logits s [BM, BN] (base 2, -inf where not visible) and values v [BN, BV] into acc
    [BM, BV] and l_i [BM], both relative to m_i, the running max logit; -> (acc, l_i, m_i)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    prob = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(prob, 1)
    acc = tl.dot(prob.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def softmax_bwd_dq_tiles(
    dq, ds_sum, q, do, lse, delta, p, K, V, M, stride_kt, stride_vt, Tk, D, Dv, start, t_lo, t_hi, window, qk_scale,
    BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK: tl.constexpr, ROWSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq [BM, BD] += ds @ k over the key tiles of softmax_fwd_tiles, with P = exp2(s - lse) and
    ds = P * (do.v - delta) (the gradient of the natural logits); ROWSUM also sums ds over the keys."""
    d = tl.arange(0, BD)
    e = tl.arange(0, BV)
    for t in range(t_lo, t_hi):
        j = start + t * BN + tl.arange(0, BN)
        k = tl.load(K + j[:, None] * stride_kt + d[None, :], mask=(j[:, None] < Tk) & (d[None, :] < D), other=0.0)
        v = tl.load(V + j[:, None] * stride_vt + e[None, :], mask=(j[:, None] < Tk) & (e[None, :] < Dv), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
        if MASK:
            s = tl.where(visible(p[:, None], j[None, :], window, WINDOW), s, float("-inf"))
        if HAS_MASK:
            s = tl.where(load_key_mask(M, j, Tk)[None, :], s, float("-inf"))
        prob = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BM, BN]
        ds = prob * (dp - delta[:, None])
        if ROWSUM:
            ds_sum += tl.sum(ds, 1)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq, ds_sum


@triton.jit
def softmax_bwd_dkv_tiles(
    dk, dv, k, v, j, window_factor, Q, DO, LSE, DELTA, R, IDX, stride_qt, stride_dot, Tq, off, D, Dv, start, u_lo, u_hi,
    window, qk_scale,
    BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr, MASK: tl.constexpr,
    MAX_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dk [BN, BD] += ds^T @ q and dv [BN, BV] += P^T @ do for keys j over query tiles [u_lo, u_hi) of BM queries
    from query index `start` (keys masked by key_mask are zeroed by the caller).

    MAX_GRAD (hybrid): P and ds carry the factor window_factor, and each query i's logit max c_i (attained at key IDX_i)
    takes the gradient -R_i, which amax hands to that key.
    """
    d = tl.arange(0, BD)
    e = tl.arange(0, BV)
    for u in range(u_lo, u_hi):
        i = start + u * BM + tl.arange(0, BM)
        q = tl.load(Q + i[:, None] * stride_qt + d[None, :], mask=(i[:, None] < Tq) & (d[None, :] < D), other=0.0)
        do = tl.load(DO + i[:, None] * stride_dot + e[None, :], mask=(i[:, None] < Tq) & (e[None, :] < Dv), other=0.0)
        lse = tl.load(LSE + i, mask=i < Tq, other=float("inf"))
        delta = tl.load(DELTA + i, mask=i < Tq, other=0.0)
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BN, BM]
        if MASK:
            s = tl.where(visible(off + i[None, :], j[:, None], window, WINDOW), s, float("-inf"))
        prob = tl.exp2(s - lse[None, :])
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BN, BM]
        ds = prob * (dp - delta[None, :])
        if MAX_GRAD:
            r = tl.load(R + i, mask=i < Tq, other=0.0)
            idx = tl.load(IDX + i, mask=i < Tq, other=-1)
            prob = prob * window_factor
            ds = ds * window_factor - tl.where(j[:, None] == idx[None, :], r[None, :], 0.0)
        dv = tl.dot(prob.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


# --- kernels ----------------------------------------------------------------------------------------------------------


@triton.jit
def softmax_attention_fwd_kernel(
    Q, K, V, M, O, LSE,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    H, G, Tq, Tk, D, Dv, window, qk_scale, tiles_per_split,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, KEY_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """With KEY_SPLITS, program (i_m, i_bh, i_s) covers only key tiles [i_s, i_s + 1) * tiles_per_split of its query
    block and stores its unnormalised acc, l and m in O and LSE (fp32 [splits, B * H, Tq, Dv] and [2, ...]) for
    `softmax_combine_kernel`: flash-decoding, so that a few long queries fill the GPU."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    off = Tk - Tq
    i = i_m * BM + tl.arange(0, BM)
    d = tl.arange(0, BD)
    e = tl.arange(0, BV)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + (i_h // G) * stride_kh
    V += i_b * stride_vb + (i_h // G) * stride_vh
    M += i_b * Tk

    q = tl.load(Q + i[:, None] * stride_qt + d[None, :], mask=(i[:, None] < Tq) & (d[None, :] < D), other=0.0)
    p_min = off + i_m * BM
    p_max = off + tl.minimum(i_m * BM + BM, Tq) - 1
    start, n, lo, hi = key_blocks(p_min, p_max, window, BN, WINDOW, SPLIT)
    first = 0
    if KEY_SPLITS:  # this program's share of the tiles: every loop bound clamped to [first, n)
        first = tl.program_id(2) * tiles_per_split
        n = tl.minimum(n, first + tiles_per_split)
        lo = tl.minimum(tl.maximum(lo, first), n)
        hi = tl.minimum(tl.maximum(hi, first), n)
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    m_i = tl.full([BM], NEG_BIG, dtype=tl.float32)
    idx = tl.zeros([BM], dtype=tl.int32)
    args = (q, off + i, K, V, M, stride_kt, stride_vt, Tk, D, Dv, start)
    acc, l_i, m_i, idx = softmax_fwd_tiles(
        acc, l_i, m_i, idx, *args, first, lo, window, qk_scale, BN, BD, BV, WINDOW, HAS_MASK, True, False,
        DOT_PRECISION,
    )
    acc, l_i, m_i, idx = softmax_fwd_tiles(
        acc, l_i, m_i, idx, *args, lo, hi, window, qk_scale, BN, BD, BV, WINDOW, HAS_MASK, False, False, DOT_PRECISION
    )
    acc, l_i, m_i, idx = softmax_fwd_tiles(
        acc, l_i, m_i, idx, *args, hi, n, window, qk_scale, BN, BD, BV, WINDOW, HAS_MASK, True, False, DOT_PRECISION
    )
    if KEY_SPLITS:
        row = (tl.program_id(2) * tl.num_programs(1) + i_bh).to(tl.int64) * Tq + i
        tl.store(O + row[:, None] * Dv + e[None, :], acc, mask=(i[:, None] < Tq) & (e[None, :] < Dv))
        parts = tl.num_programs(2) * tl.num_programs(1) * Tq
        tl.store(LSE + row, l_i, mask=i < Tq)
        tl.store(LSE + parts + row, m_i, mask=i < Tq)
    else:
        # A query without visible keys: o = 0 and lse = +inf, so that the backward's P is 0 too.
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        O += i_b * stride_ob + i_h * stride_oh
        o_mask = (i[:, None] < Tq) & (e[None, :] < Dv)
        tl.store(O + i[:, None] * stride_ot + e[None, :], o.to(O.dtype.element_ty), mask=o_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
        tl.store(LSE + i_bh.to(tl.int64) * Tq + i, lse, mask=i < Tq)


@triton.jit
def softmax_combine_kernel(
    PART, ML, O, LSE, stride_ob, stride_ot, stride_oh, H, Tq, Dv, splits, BM: tl.constexpr, BV: tl.constexpr,
):
    """o and lse of queries [i_m * BM, +BM) of head i_bh from the per-split acc, l and m of the split forward."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    n_bh = tl.num_programs(1)
    i = i_m * BM + tl.arange(0, BM)
    e = tl.arange(0, BV)
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    m_i = tl.full([BM], NEG_BIG, dtype=tl.float32)
    for s in range(splits):
        row = (s * n_bh + i_bh).to(tl.int64) * Tq + i
        part = tl.load(PART + row[:, None] * Dv + e[None, :], mask=(i[:, None] < Tq) & (e[None, :] < Dv), other=0.0)
        l_s = tl.load(ML + row, mask=i < Tq, other=0.0)
        m_s = tl.load(ML + splits * n_bh * Tq + row, mask=i < Tq, other=NEG_BIG)
        m_new = tl.maximum(m_i, m_s)
        alpha, beta = tl.exp2(m_i - m_new), tl.exp2(m_s - m_new)
        acc = acc * alpha[:, None] + part * beta[:, None]
        l_i = l_i * alpha + l_s * beta
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    O += i_b * stride_ob + i_h * stride_oh
    tl.store(O + i[:, None] * stride_ot + e[None, :], o.to(O.dtype.element_ty), mask=(i[:, None] < Tq) & (e[None, :] < Dv))
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    tl.store(LSE + i_bh.to(tl.int64) * Tq + i, lse, mask=i < Tq)


@triton.jit
def softmax_attention_bwd_dq_kernel(
    Q, K, V, M, O, DO, LSE, DELTA, DQ,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
    H, G, Tq, Tk, D, Dv, window, qk_scale, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    off = Tk - Tq
    i = i_m * BM + tl.arange(0, BM)
    d = tl.arange(0, BD)
    e = tl.arange(0, BV)
    K += i_b * stride_kb + (i_h // G) * stride_kh
    V += i_b * stride_vb + (i_h // G) * stride_vh
    M += i_b * Tk

    q_mask = (i[:, None] < Tq) & (d[None, :] < D)
    q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + i[:, None] * stride_qt + d[None, :], mask=q_mask, other=0.0)
    do = tl.load(
        DO + i_b * stride_dob + i_h * stride_doh + i[:, None] * stride_dot + e[None, :],
        mask=(i[:, None] < Tq) & (e[None, :] < Dv), other=0.0,
    )
    o = tl.load(
        O + i_b * stride_ob + i_h * stride_oh + i[:, None] * stride_ot + e[None, :],
        mask=(i[:, None] < Tq) & (e[None, :] < Dv), other=0.0,
    )
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # sum_j P_ij dp_ij, for dk/dv too
    tl.store(DELTA + i_bh.to(tl.int64) * Tq + i, delta, mask=i < Tq)
    lse = tl.load(LSE + i_bh.to(tl.int64) * Tq + i, mask=i < Tq, other=float("inf"))
    p_min = off + i_m * BM
    p_max = off + tl.minimum(i_m * BM + BM, Tq) - 1
    start, n, lo, hi = key_blocks(p_min, p_max, window, BN, WINDOW, SPLIT)
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    ds_sum = tl.zeros([BM], dtype=tl.float32)
    args = (q, do, lse, delta, off + i, K, V, M, stride_kt, stride_vt, Tk, D, Dv, start)
    dq, ds_sum = softmax_bwd_dq_tiles(
        dq, ds_sum, *args, 0, lo, window, qk_scale, BN, BD, BV, WINDOW, HAS_MASK, True, False, DOT_PRECISION
    )
    dq, ds_sum = softmax_bwd_dq_tiles(
        dq, ds_sum, *args, lo, hi, window, qk_scale, BN, BD, BV, WINDOW, HAS_MASK, False, False, DOT_PRECISION
    )
    dq, ds_sum = softmax_bwd_dq_tiles(
        dq, ds_sum, *args, hi, n, window, qk_scale, BN, BD, BV, WINDOW, HAS_MASK, True, False, DOT_PRECISION
    )
    tl.store(
        DQ + i_b * stride_qb + i_h * stride_qh + i[:, None] * stride_qt + d[None, :],
        (dq * scale).to(DQ.dtype.element_ty), mask=q_mask,
    )


@triton.jit
def softmax_attention_bwd_dkv_kernel(
    Q, K, V, M, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    H, G, Tq, Tk, D, Dv, window, qk_scale, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per key block and kv head: the query heads of the group add into the same dk, dv.
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    Hkv = H // G
    i_b, i_hk = (i_bh // Hkv).to(tl.int64), i_bh % Hkv
    off = Tk - Tq
    j = i_n * BN + tl.arange(0, BN)
    d = tl.arange(0, BD)
    e = tl.arange(0, BV)
    k_mask = (j[:, None] < Tk) & (d[None, :] < D)
    v_mask = (j[:, None] < Tk) & (e[None, :] < Dv)
    k_ptrs = i_b * stride_kb + i_hk * stride_kh + j[:, None] * stride_kt + d[None, :]
    v_ptrs = i_b * stride_vb + i_hk * stride_vh + j[:, None] * stride_vt + e[None, :]
    k = tl.load(K + k_ptrs, mask=k_mask, other=0.0)
    v = tl.load(V + v_ptrs, mask=v_mask, other=0.0)

    start, n, lo, hi = query_blocks(i_n * BN, off, Tq, window, BN, BM, WINDOW, SPLIT)
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BV], dtype=tl.float32)
    for g in range(G):
        i_h = i_hk * G + g
        rows = (i_b * H + i_h) * Tq
        args = (
            k, v, j, 1.0, Q + i_b * stride_qb + i_h * stride_qh, DO + i_b * stride_dob + i_h * stride_doh,
            LSE + rows, DELTA + rows, LSE, LSE, stride_qt, stride_dot, Tq, off, D, Dv, start,
        )
        # (constexprs stay out of the args tuple: a tuple does not keep them constexpr)
        dk, dv = softmax_bwd_dkv_tiles(
            dk, dv, *args, 0, lo, window, qk_scale, BM, BD, BV, WINDOW, True, False, DOT_PRECISION
        )
        dk, dv = softmax_bwd_dkv_tiles(
            dk, dv, *args, lo, hi, window, qk_scale, BM, BD, BV, WINDOW, False, False, DOT_PRECISION
        )
        dk, dv = softmax_bwd_dkv_tiles(
            dk, dv, *args, hi, n, window, qk_scale, BM, BD, BV, WINDOW, True, False, DOT_PRECISION
        )
    if HAS_MASK:  # a padded key is seen by no query
        real = load_key_mask(M + i_b * Tk, j, Tk)[:, None]
        dk = tl.where(real, dk, 0.0)
        dv = tl.where(real, dv, 0.0)
    tl.store(DK + k_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + v_ptrs, dv.to(DV.dtype.element_ty), mask=v_mask)


# --- host side --------------------------------------------------------------------------------------------------------


def _num_warps(head_dim_block: int) -> int:
    return 4 if head_dim_block <= 64 else 8


def split_loops(window) -> bool:
    """Loop apart over the tiles that need no causal/window mask only when there are many of them: with a few
    tiles per program, one pipelined loop is faster (H200, window 128: 1.95 ms fwd+bwd against 2.15)."""
    return window is None or window > SPLIT_WINDOW


def _softmax_blocks(q_len, window, head_dim_block):
    """(BM, BN, num_warps): long key ranges take larger query blocks; short windows waste less with smaller ones."""
    if split_loops(window):
        return block_size(q_len, BLOCK_M_FULL), BLOCK_N, _num_warps(head_dim_block)
    return block_size(q_len, BLOCK_M), BLOCK_N, 4


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device; the interpreter (CPU tensors) counts as a small GPU, so its tests take the split path."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def key_splits(programs: int, key_tiles: int, device: torch.device) -> int:
    """Parts of a key range of `key_tiles` tiles that run in parallel (the forward's flash-decoding, the hybrid
    kernels' state-scan segments): 1 while `programs` alone fill the GPU, else enough for about two programs per SM,
    each over SPLIT_MIN_TILES tiles or more (at batch 1, a model has only B * H programs per layer)."""
    target = 2 * multiprocessor_count(device)
    if programs * 2 > target or key_tiles < 2 * SPLIT_MIN_TILES:
        return 1
    return max(1, min(cdiv(target, programs), key_tiles // SPLIT_MIN_TILES))


def split_range(tiles: int, parts: int) -> tuple[int, int]:
    """(parts, tiles per part) covering `tiles` in at most `parts` equal runs, none of them empty."""
    per_part = cdiv(tiles, parts)
    return cdiv(tiles, per_part), per_part


def key_mask_arg(key_mask, like):
    """(the mask as the kernels read it: int8, 0 for masked out; whether there is one). A bool mask is reinterpreted
    in place, not converted (a decode step passes several)."""
    if key_mask is None:
        return like, False
    if key_mask.dtype == torch.bool:
        return key_mask.contiguous().view(torch.int8), True
    return (key_mask != 0).to(torch.int8).contiguous(), True


def _softmax_attention_fwd(q, k, v, window, key_mask, scale):
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    BD, BV = block_size(D), block_size(Dv)
    BM, BN, num_warps = _softmax_blocks(Tq, window, max(BD, BV))
    o = torch.empty(B, Tq, H, Dv, dtype=v.dtype, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    mask, has_mask = key_mask_arg(key_mask, q)
    q_blocks = cdiv(Tq, BM)
    tiles = cdiv(min(Tk, Tq + window - 1 if window else Tk), BN) + 1  # of one query block, at most
    splits, tiles_per_split = split_range(tiles, key_splits(q_blocks * B * H, tiles, q.device))
    if splits > 1:
        partial = torch.empty(splits, B * H, Tq, Dv, dtype=torch.float32, device=q.device)
        lm = torch.empty(2, splits, B * H, Tq, dtype=torch.float32, device=q.device)  # l, then m
        out, stats = partial, lm
    else:
        out, stats = o, lse
    softmax_attention_fwd_kernel[(q_blocks, B * H, splits)](
        q, k, v, mask, out, stats, *bth_strides(q, k, v, o),
        H, H // Hkv, Tq, Tk, D, Dv, window or 0, scale * LOG2E, tiles_per_split,
        BM=BM, BN=BN, BD=BD, BV=BV, WINDOW=window is not None, HAS_MASK=has_mask, SPLIT=split_loops(window),
        KEY_SPLITS=splits > 1, DOT_PRECISION=dot_precision(q), num_warps=num_warps, num_stages=NUM_STAGES,
    )
    if splits > 1:
        softmax_combine_kernel[(q_blocks, B * H)](
            partial, lm, o, lse, *o.stride()[:3], H, Tq, Dv, splits, BM=BM, BV=BV, num_warps=4
        )
    return o, lse


def _softmax_attention_bwd(q, k, v, o, lse, do, window, key_mask, scale):
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    BD, BV = block_size(D), block_size(Dv)
    BM, BN, num_warps = _softmax_blocks(Tq, window, max(BD, BV))
    delta = torch.empty_like(lse)  # written by the dq kernel, read by the dk/dv kernel
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask, has_mask = key_mask_arg(key_mask, q)
    common = dict(BM=BM, BN=BN, BD=BD, BV=BV, WINDOW=window is not None, HAS_MASK=has_mask, SPLIT=split_loops(window),
                  DOT_PRECISION=dot_precision(q), num_warps=num_warps, num_stages=NUM_STAGES)
    sizes = (H, H // Hkv, Tq, Tk, D, Dv, window or 0, scale * LOG2E, scale)
    softmax_attention_bwd_dq_kernel[(cdiv(Tq, BM), B * H)](
        q, k, v, mask, o, do, lse, delta, dq, *bth_strides(q, k, v, o, do), *sizes, **common
    )
    softmax_attention_bwd_dkv_kernel[(cdiv(Tk, BN), B * Hkv)](
        q, k, v, mask, do, lse, delta, dk, dv, *bth_strides(q, k, v, do), *sizes, **common
    )
    return dq, dk, dv


class SoftmaxAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, key_mask, scale):
        o, lse = _softmax_attention_fwd(q, k, v, window, key_mask, scale)
        ctx.save_for_backward(q, k, v, o, lse, key_mask)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_mask = ctx.saved_tensors
        dq, dk, dv = _softmax_attention_bwd(q, k, v, o, lse, unit_last_dim(do), ctx.window, key_mask, ctx.scale)
        return dq, dk, dv, None, None, None


def softmax_attention(q, k, v, window=None, key_mask=None, scale=None):
    """Triton twin of the reference `softmax_attention` (same arguments, result, errors)."""
    check_attention_inputs(q, k, v, key_mask)
    if window is not None:
        check_window(window)
    dtype = kernel_dtype(q, k, v)
    if dtype is None:
        return softmax_attention_reference(q, k, v, window, key_mask, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    q, k, v = (kernel_layout(x.to(dtype)) for x in (q, k, v))
    return SoftmaxAttentionFunction.apply(q, k, v, window, key_mask, scale).to(out_dtype)
