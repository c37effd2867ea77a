"""Triton sliding-window softmax attention and LoLCATs hybrid attention, for [batch, time, heads, dim] tensors.

Same signatures and semantics as the references in hf_based.kernels.softmax_attention and
hf_based.kernels.hybrid_attention: the Tq queries are the last Tq of the Tk keys (query i sits at key position
p = Tk - Tq + i), query head h reads kv head h // (H // Hkv), outputs come back in v.dtype and states in fp32.

softmax_attention is FlashAttention-2: an online softmax over the key blocks that hold a query block's window, so a
sliding window costs O(T * window); the backward recomputes the probabilities from the saved log-sum-exp, dq per
query block and dk/dv per key block.

hybrid_attention cuts the keys of query block m (queries [m BT, (m + 1) BT)) at b_m = Tk - Tq + m BT - window + 1,
where the window of its first query starts:
- keys j < b_m are older than the window of every query in the block: a chunked scan over key chunks
  [b_m, b_m + BT) (the query grid shifted by b_0) gives the linear state HS[m] = kv0 + sum_{j < b_m} phi_k v_j^T;
- keys [b_m, b_m + BT) are older than the window of some of them (j <= p - window): one quadratic band tile;
- the window keys [p - window + 1, p] go through the online softmax of the softmax kernels (shared helpers), which
  also keep c, each query's max window logit, and its arg max.
The backward mirrors it: a reverse scan gives key chunk m the sum over the later query blocks of
phi_q(q_i) (do_i / den_i)^T, and the gradient of c, which torch's amax hands to the arg max key, is folded into the
window tiles.
"""

import torch
import triton
import triton.language as tl

from hf_based.kernels._checks import (
    check_attention_inputs,
    check_shape,
    check_window,
    kernel_dtype,
    prepare_state,
)
from hf_based.kernels.hybrid_attention import hybrid_attention as hybrid_attention_reference
from hf_based.kernels.softmax_attention import softmax_attention as softmax_attention_reference

# Block sizes (powers of 2, >= 16). Tests shrink them so that small problems cover several blocks.
BLOCK_M = 64  # softmax, sliding window: queries per program
BLOCK_M_FULL = 128  # softmax, full causal or window > SPLIT_WINDOW: queries per program
BLOCK_N = 64  # softmax: keys per tile
BLOCK_T = 64  # hybrid: queries per program = keys per linear-state chunk
BLOCK_K = 64  # hybrid: feature chunk
BLOCK_V = 64  # hybrid state scans and decode: value columns per program
BLOCK_DECODE = 64  # decode: keys per tile
NUM_STAGES = 2  # software pipelining depth of the key/query loops
HYBRID_NUM_WARPS = 4  # H200, hd 128, F 128, window 64: 4.7 ms fwd+bwd against 7.7 with 8 warps
SPLIT_WINDOW = 256  # larger windows (and None) loop apart over the tiles that need no causal/window mask

LOG2E = 1.4426950408889634  # log2(e): the kernels keep logits in base 2 for exp2
TINY = tl.constexpr(torch.finfo(torch.float32).tiny)  # the reference's denominator clamp
NEG_BIG = tl.constexpr(-1.0e30)  # running max of a row without visible keys: exp2(-inf - NEG_BIG) = 0, never NaN


# --- shared tiles ---------------------------------------------------------------------------------------------------


@triton.jit
def _visible(p, j, window, WINDOW: tl.constexpr):
    """Query positions p and key positions j, broadcast against each other: causal, and inside the window."""
    vis = j <= p
    if WINDOW:
        vis = vis & (j > p - window)
    return vis


@triton.jit
def _key_mask(M, j, Tk):
    """key_mask of keys j (0 = padding); keys outside [0, Tk) count as padding."""
    return tl.load(M + j, mask=(j >= 0) & (j < Tk), other=0) != 0


@triton.jit
def _key_blocks(p_min, p_max, window, BN: tl.constexpr, WINDOW: tl.constexpr, SPLIT: tl.constexpr):
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
def _query_blocks(n0, off, Tq, window, BN: tl.constexpr, BM: tl.constexpr, WINDOW: tl.constexpr, SPLIT: tl.constexpr):
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
def _window_fwd_tiles(
    acc, l_i, m_i, idx, q, p, K, V, M, stride_kt, stride_vt, Tk, D, Dv, start, t_lo, t_hi, window, qk_scale,
    BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK: tl.constexpr, ARGMAX: tl.constexpr, PRECISION: tl.constexpr,
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
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN]
        if MASK:
            s = tl.where(_visible(p[:, None], j[None, :], window, WINDOW), s, float("-inf"))
        if HAS_MASK:
            s = tl.where(_key_mask(M, j, Tk)[None, :], s, float("-inf"))
        s_max = tl.max(s, 1)
        if ARGMAX:
            idx = tl.where(s_max > m_i, start + t * BN + tl.argmax(s, 1), idx)
        m_new = tl.maximum(m_i, s_max)
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        acc = tl.dot(prob.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i, idx


@triton.jit
def _window_bwd_dq_tiles(
    dq, ds_sum, q, do, lse, delta, p, K, V, M, stride_kt, stride_vt, Tk, D, Dv, start, t_lo, t_hi, window, qk_scale,
    BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK: tl.constexpr, ROWSUM: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq [BM, BD] += ds @ k over the key tiles of _window_fwd_tiles, with P = exp2(s - lse) and
    ds = P * (do.v - delta) (the gradient of the natural logits); ROWSUM also sums ds over the keys."""
    d = tl.arange(0, BD)
    e = tl.arange(0, BV)
    for t in range(t_lo, t_hi):
        j = start + t * BN + tl.arange(0, BN)
        k = tl.load(K + j[:, None] * stride_kt + d[None, :], mask=(j[:, None] < Tk) & (d[None, :] < D), other=0.0)
        v = tl.load(V + j[:, None] * stride_vt + e[None, :], mask=(j[:, None] < Tk) & (e[None, :] < Dv), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN]
        if MASK:
            s = tl.where(_visible(p[:, None], j[None, :], window, WINDOW), s, float("-inf"))
        if HAS_MASK:
            s = tl.where(_key_mask(M, j, Tk)[None, :], s, float("-inf"))
        prob = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BM, BN]
        ds = prob * (dp - delta[:, None])
        if ROWSUM:
            ds_sum += tl.sum(ds, 1)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq, ds_sum


@triton.jit
def _window_bwd_dkv_tiles(
    dk, dv, k, v, j, gamma, Q, DO, LSE, DELTA, R, IDX, stride_qt, stride_dot, Tq, off, D, Dv, start, u_lo, u_hi,
    window, qk_scale,
    BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr, MASK: tl.constexpr,
    MAX_GRAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk [BN, BD] += ds^T @ q and dv [BN, BV] += P^T @ do for keys j over query tiles [u_lo, u_hi) of BM queries
    from query index `start` (keys masked by key_mask are zeroed by the caller).

    MAX_GRAD (hybrid): P and ds carry the factor gamma, and each query i's logit max c_i (attained at key IDX_i)
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
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BN, BM]
        if MASK:
            s = tl.where(_visible(off + i[None, :], j[:, None], window, WINDOW), s, float("-inf"))
        prob = tl.exp2(s - lse[None, :])
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BN, BM]
        ds = prob * (dp - delta[None, :])
        if MAX_GRAD:
            r = tl.load(R + i, mask=i < Tq, other=0.0)
            idx = tl.load(IDX + i, mask=i < Tq, other=-1)
            prob = prob * gamma
            ds = ds * gamma - tl.where(j[:, None] == idx[None, :], r[None, :], 0.0)
        dv = tl.dot(prob.to(do.dtype), do, dv, input_precision=PRECISION)
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


# --- softmax attention ----------------------------------------------------------------------------------------------


@triton.jit
def window_attn_fwd_kernel(
    Q, K, V, M, O, LSE,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    H, G, Tq, Tk, D, Dv, window, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
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
    start, n, lo, hi = _key_blocks(p_min, p_max, window, BN, WINDOW, SPLIT)
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    m_i = tl.full([BM], NEG_BIG, dtype=tl.float32)
    idx = tl.zeros([BM], dtype=tl.int32)
    args = (q, off + i, K, V, M, stride_kt, stride_vt, Tk, D, Dv, start)
    acc, l_i, m_i, idx = _window_fwd_tiles(
        acc, l_i, m_i, idx, *args, 0, lo, window, qk_scale, BN, BD, BV, WINDOW, HAS_MASK, True, False, PRECISION
    )
    acc, l_i, m_i, idx = _window_fwd_tiles(
        acc, l_i, m_i, idx, *args, lo, hi, window, qk_scale, BN, BD, BV, WINDOW, HAS_MASK, False, False, PRECISION
    )
    acc, l_i, m_i, idx = _window_fwd_tiles(
        acc, l_i, m_i, idx, *args, hi, n, window, qk_scale, BN, BD, BV, WINDOW, HAS_MASK, True, False, PRECISION
    )
    # A query without visible keys: o = 0 and lse = +inf, so that the backward's P is 0 too.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    O += i_b * stride_ob + i_h * stride_oh
    o_mask = (i[:, None] < Tq) & (e[None, :] < Dv)
    tl.store(O + i[:, None] * stride_ot + e[None, :], o.to(O.dtype.element_ty), mask=o_mask)
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    tl.store(LSE + i_bh.to(tl.int64) * Tq + i, lse, mask=i < Tq)


@triton.jit
def window_attn_bwd_dq_kernel(
    Q, K, V, M, O, DO, LSE, DELTA, DQ,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
    H, G, Tq, Tk, D, Dv, window, qk_scale, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
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
    start, n, lo, hi = _key_blocks(p_min, p_max, window, BN, WINDOW, SPLIT)
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    ds_sum = tl.zeros([BM], dtype=tl.float32)
    args = (q, do, lse, delta, off + i, K, V, M, stride_kt, stride_vt, Tk, D, Dv, start)
    dq, ds_sum = _window_bwd_dq_tiles(
        dq, ds_sum, *args, 0, lo, window, qk_scale, BN, BD, BV, WINDOW, HAS_MASK, True, False, PRECISION
    )
    dq, ds_sum = _window_bwd_dq_tiles(
        dq, ds_sum, *args, lo, hi, window, qk_scale, BN, BD, BV, WINDOW, HAS_MASK, False, False, PRECISION
    )
    dq, ds_sum = _window_bwd_dq_tiles(
        dq, ds_sum, *args, hi, n, window, qk_scale, BN, BD, BV, WINDOW, HAS_MASK, True, False, PRECISION
    )
    tl.store(
        DQ + i_b * stride_qb + i_h * stride_qh + i[:, None] * stride_qt + d[None, :],
        (dq * scale).to(DQ.dtype.element_ty), mask=q_mask,
    )


@triton.jit
def window_attn_bwd_dkv_kernel(
    Q, K, V, M, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    H, G, Tq, Tk, D, Dv, window, qk_scale, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
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

    start, n, lo, hi = _query_blocks(i_n * BN, off, Tq, window, BN, BM, WINDOW, SPLIT)
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
        dk, dv = _window_bwd_dkv_tiles(
            dk, dv, *args, 0, lo, window, qk_scale, BM, BD, BV, WINDOW, True, False, PRECISION
        )
        dk, dv = _window_bwd_dkv_tiles(
            dk, dv, *args, lo, hi, window, qk_scale, BM, BD, BV, WINDOW, False, False, PRECISION
        )
        dk, dv = _window_bwd_dkv_tiles(
            dk, dv, *args, hi, n, window, qk_scale, BM, BD, BV, WINDOW, True, False, PRECISION
        )
    if HAS_MASK:  # a padded key is seen by no query
        real = _key_mask(M + i_b * Tk, j, Tk)[:, None]
        dk = tl.where(real, dk, 0.0)
        dv = tl.where(real, dv, 0.0)
    tl.store(DK + k_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + v_ptrs, dv.to(DV.dtype.element_ty), mask=v_mask)


# --- hybrid attention -----------------------------------------------------------------------------------------------


@triton.jit
def hybrid_state_fwd_kernel(
    KF, V, M, H0, Z0, HS, ZS, HT, ZT,
    stride_kfb, stride_kft, stride_kfh, stride_vb, stride_vt, stride_vh,
    H, G, Tk, F, Dv, b0, m_min, NQ, fold_end,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr,
    STORE_STATES: tl.constexpr, OUTPUT_FINAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """HS[b, h, m] = kv0 + sum_{0 <= j < b0 + m BT} phi_k(k_j) v_j^T (ZS: of phi_k(k_j)) for m in [0, NQ): the keys
    older than the window of every query of block m; the final state folds keys [0, fold_end)."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    f = i_k * BK + tl.arange(0, BK)
    e = i_v * BV + tl.arange(0, BV)
    KF += i_b * stride_kfb + i_h * stride_kfh
    V += i_b * stride_vb + (i_h // G) * stride_vh
    M += i_b * Tk
    state = i_bh.to(tl.int64) * F * Dv + f[:, None] * Dv + e[None, :]
    state_mask = (f[:, None] < F) & (e[None, :] < Dv)
    if HAS_INIT:
        kv = tl.load(H0 + state, mask=state_mask, other=0.0)  # [BK, BV]
        z = tl.load(Z0 + i_bh.to(tl.int64) * F + f, mask=f < F, other=0.0)  # [BK]
    else:
        kv = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
    for m in range(m_min, NQ):  # chunk m holds keys [b0 + m BT, b0 + (m + 1) BT); m < 0: keys before the queries'
        if STORE_STATES:
            chunk = (i_bh.to(tl.int64) * NQ + m) * F * Dv
            tl.store(HS + chunk + f[:, None] * Dv + e[None, :], kv.to(HS.dtype.element_ty), mask=state_mask & (m >= 0))
            tl.store(ZS + (i_bh.to(tl.int64) * NQ + m) * F + f, z, mask=(f < F) & (m >= 0) & (i_v == 0))
        j = b0 + m * BT + tl.arange(0, BT)
        fold = (j >= 0) & (j < fold_end)
        if HAS_MASK:
            fold = fold & _key_mask(M, j, Tk)
        kf = tl.load(KF + j[None, :] * stride_kft + f[:, None], mask=fold[None, :] & (f[:, None] < F), other=0.0)
        v = tl.load(V + j[:, None] * stride_vt + e[None, :], mask=fold[:, None] & (e[None, :] < Dv), other=0.0)
        kv = tl.dot(kf, v, kv, input_precision=PRECISION)  # [BK, BT] @ [BT, BV]
        z += tl.sum(kf.to(tl.float32), 1)
    if OUTPUT_FINAL:
        tl.store(HT + state, kv, mask=state_mask)
        tl.store(ZT + i_bh.to(tl.int64) * F + f, z, mask=(f < F) & (i_v == 0))


@triton.jit
def hybrid_fwd_kernel(
    Q, K, V, QF, KF, M, GAMMA, HS, ZS, O, O32, C, DEN, IDX,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_qfb, stride_qft, stride_qfh, stride_kfb, stride_kft, stride_kfh, stride_ob, stride_ot, stride_oh,
    H, G, Tq, Tk, D, Dv, F, window, qk_scale,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr,
    SPLIT: tl.constexpr, STORE_O32: tl.constexpr, PRECISION: tl.constexpr,
):
    """O = num / den of query block m; O32 (same layout as O) keeps it in fp32 for the backward's do . o, whose
    rounding the gradient of gamma would amplify: d o / d gamma = (window average - o) * (window weight) / den."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    NQ = tl.num_programs(0)
    off = Tk - Tq
    i = i_m * BT + tl.arange(0, BT)
    d = tl.arange(0, BD)
    e = tl.arange(0, BV)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + (i_h // G) * stride_kh
    V += i_b * stride_vb + (i_h // G) * stride_vh
    QF += i_b * stride_qfb + i_h * stride_qfh
    KF += i_b * stride_kfb + i_h * stride_kfh
    M += i_b * Tk

    # softmax over the window keys, relative to c = the max window logit
    q = tl.load(Q + i[:, None] * stride_qt + d[None, :], mask=(i[:, None] < Tq) & (d[None, :] < D), other=0.0)
    p_min = off + i_m * BT
    p_max = off + tl.minimum(i_m * BT + BT, Tq) - 1
    start, n, lo, hi = _key_blocks(p_min, p_max, window, BT, True, SPLIT)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    l_i = tl.zeros([BT], dtype=tl.float32)
    m_i = tl.full([BT], NEG_BIG, dtype=tl.float32)
    idx = tl.zeros([BT], dtype=tl.int32)
    args = (q, off + i, K, V, M, stride_kt, stride_vt, Tk, D, Dv, start)
    acc, l_i, m_i, idx = _window_fwd_tiles(
        acc, l_i, m_i, idx, *args, 0, lo, window, qk_scale, BT, BD, BV, True, HAS_MASK, True, True, PRECISION
    )
    acc, l_i, m_i, idx = _window_fwd_tiles(
        acc, l_i, m_i, idx, *args, lo, hi, window, qk_scale, BT, BD, BV, True, HAS_MASK, False, True, PRECISION
    )
    acc, l_i, m_i, idx = _window_fwd_tiles(
        acc, l_i, m_i, idx, *args, hi, n, window, qk_scale, BT, BD, BV, True, HAS_MASK, True, True, PRECISION
    )
    c = tl.where(l_i > 0, m_i, 0.0)  # an empty window has no c: 0 keeps the backward's exp2(s - c) finite
    gamma = tl.load(GAMMA + i_h)
    acc *= gamma
    l_i *= gamma

    # linear part: the state of keys < b_m, then the band of keys [b_m, b_m + BT) older than the window
    jb = p_min - window + 1 + tl.arange(0, BT)
    jb_in = (jb >= 0) & (jb < Tk)
    chunk = i_bh.to(tl.int64) * NQ + i_m
    a = tl.zeros([BT, BT], dtype=tl.float32)
    for f0 in range(0, F, BK):
        f = f0 + tl.arange(0, BK)
        qf = tl.load(QF + i[:, None] * stride_qft + f[None, :], mask=(i[:, None] < Tq) & (f[None, :] < F), other=0.0)
        kf = tl.load(KF + jb[:, None] * stride_kft + f[None, :], mask=jb_in[:, None] & (f[None, :] < F), other=0.0)
        h_mask = (f[:, None] < F) & (e[None, :] < Dv)
        h = tl.load(HS + chunk * F * Dv + f[:, None] * Dv + e[None, :], mask=h_mask, other=0.0)  # [BK, BV]
        z = tl.load(ZS + chunk * F + f, mask=f < F, other=0.0)
        acc = tl.dot(qf, h, acc, input_precision=PRECISION)
        l_i += tl.sum(qf.to(tl.float32) * z[None, :], 1)
        a = tl.dot(qf, tl.trans(kf), a, input_precision=PRECISION)  # [BT, BT]
    band = (jb[None, :] <= off + i[:, None] - window) & (jb[None, :] >= 0)
    if HAS_MASK:
        band = band & _key_mask(M, jb, Tk)[None, :]
    a = tl.where(band, a, 0.0)
    vb = tl.load(V + jb[:, None] * stride_vt + e[None, :], mask=jb_in[:, None] & (e[None, :] < Dv), other=0.0)
    acc = tl.dot(a.to(vb.dtype), vb, acc, input_precision=PRECISION)
    l_i += tl.sum(a, 1)

    o = acc / tl.maximum(l_i, TINY)[:, None]
    o_ptrs = i_b * stride_ob + i_h * stride_oh + i[:, None] * stride_ot + e[None, :]
    o_mask = (i[:, None] < Tq) & (e[None, :] < Dv)
    tl.store(O + o_ptrs, o.to(O.dtype.element_ty), mask=o_mask)
    if STORE_O32:
        tl.store(O32 + o_ptrs, o, mask=o_mask)
    rows = i_bh.to(tl.int64) * Tq + i
    tl.store(C + rows, c, mask=i < Tq)
    tl.store(DEN + rows, l_i, mask=i < Tq)
    tl.store(IDX + rows, idx, mask=i < Tq)


@triton.jit
def hybrid_state_bwd_kernel(
    QF, DO, RDEN, DELTA, DHS, DZS, DH0, DZ0,
    stride_qfb, stride_qft, stride_qfh, stride_dob, stride_dot, stride_doh,
    H, Tq, F, Dv, NQ,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, OUTPUT_INIT_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """DHS[b, h, m + 1] = sum over query blocks after m of phi_q(q_i) (do_i / den_i)^T, m = -1..NQ-1 (DZS: of
    phi_q(q_i) delta_i / den_i): what the keys of chunk m receive through the linear state."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    f = i_k * BK + tl.arange(0, BK)
    e = i_v * BV + tl.arange(0, BV)
    QF += i_b * stride_qfb + i_h * stride_qfh
    DO += i_b * stride_dob + i_h * stride_doh
    state_mask = (f[:, None] < F) & (e[None, :] < Dv)
    dh = tl.zeros([BK, BV], dtype=tl.float32)
    dz = tl.zeros([BK], dtype=tl.float32)
    for t in range(0, NQ + 1):
        m = NQ - 1 - t
        chunk = i_bh.to(tl.int64) * (NQ + 1) + m + 1
        tl.store(DHS + chunk * F * Dv + f[:, None] * Dv + e[None, :], dh.to(DHS.dtype.element_ty), mask=state_mask)
        tl.store(DZS + chunk * F + f, dz, mask=(f < F) & (i_v == 0))
        i = m * BT + tl.arange(0, BT)
        real = (i >= 0) & (i < Tq)
        qf = tl.load(QF + i[None, :] * stride_qft + f[:, None], mask=real[None, :] & (f[:, None] < F), other=0.0)
        do = tl.load(DO + i[:, None] * stride_dot + e[None, :], mask=real[:, None] & (e[None, :] < Dv), other=0.0)
        rden = tl.load(RDEN + i_bh.to(tl.int64) * Tq + i, mask=real, other=0.0)
        delta = tl.load(DELTA + i_bh.to(tl.int64) * Tq + i, mask=real, other=0.0)
        dh = tl.dot(qf, (do * rden[:, None]).to(qf.dtype), dh, input_precision=PRECISION)  # [BK, BT] @ [BT, BV]
        dz += tl.sum(qf.to(tl.float32) * (rden * delta)[None, :], 1)
    if OUTPUT_INIT_GRAD:  # d kv0 = all queries' sum, d z0 = -(its dz)
        tl.store(DH0 + i_bh.to(tl.int64) * F * Dv + f[:, None] * Dv + e[None, :], dh, mask=state_mask)
        tl.store(DZ0 + i_bh.to(tl.int64) * F + f, -dz, mask=(f < F) & (i_v == 0))


@triton.jit
def hybrid_bwd_dq_kernel(
    Q, K, V, QF, KF, M, GAMMA, O, DO, C, DEN, IDX, HS, ZS, LSE, DELTA, RDEN, DQ, DQF, R, RSUM,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_qfb, stride_qft, stride_qfh, stride_kfb, stride_kft, stride_kfh, stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    H, G, Tq, Tk, D, Dv, F, window, qk_scale, scale,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq (window part, with c's gradient) and dq_feat (state + band) of query block m; stores the rows' LSE, RDEN,
    DELTA and R (c's gradient) for the dk/dv kernel.

    o = num / den: d num = do / den, d den = -(do . o) / den = -DELTA / den. LSE = c + log2(den): P = exp2(s - LSE)
    = exp(s - c) / den is the window weight per unit of gamma. A query without visible keys or state (den = 0,
    clamped) gets o = 0 whatever its inputs, hence no gradient (the reference's autograd gives 0 * inf = NaN).
    """
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    NQ = tl.num_programs(0)
    off = Tk - Tq
    i = i_m * BT + tl.arange(0, BT)
    d = tl.arange(0, BD)
    e = tl.arange(0, BV)
    K += i_b * stride_kb + (i_h // G) * stride_kh
    V += i_b * stride_vb + (i_h // G) * stride_vh
    QF += i_b * stride_qfb + i_h * stride_qfh
    KF += i_b * stride_kfb + i_h * stride_kfh
    M += i_b * Tk
    rows = i_bh.to(tl.int64) * Tq + i

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
    den = tl.load(DEN + rows, mask=i < Tq, other=0.0)
    seen = den >= TINY
    rden = tl.where(seen, 1.0 / tl.where(seen, den, 1.0), 0.0)
    delta = tl.where(seen, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), 0.0)
    lse = tl.where(seen, tl.load(C + rows, mask=i < Tq, other=0.0) + tl.log2(tl.where(seen, den, 1.0)), float("inf"))
    tl.store(LSE + rows, lse, mask=i < Tq)
    tl.store(RDEN + rows, rden, mask=i < Tq)
    tl.store(DELTA + rows, delta, mask=i < Tq)
    idx = tl.load(IDX + rows, mask=i < Tq, other=0)

    p_min = off + i_m * BT
    p_max = off + tl.minimum(i_m * BT + BT, Tq) - 1
    start, n, lo, hi = _key_blocks(p_min, p_max, window, BT, True, SPLIT)
    dq = tl.zeros([BT, BD], dtype=tl.float32)
    ds_sum = tl.zeros([BT], dtype=tl.float32)
    args = (q, do, lse, delta, off + i, K, V, M, stride_kt, stride_vt, Tk, D, Dv, start)
    dq, ds_sum = _window_bwd_dq_tiles(
        dq, ds_sum, *args, 0, lo, window, qk_scale, BT, BD, BV, True, HAS_MASK, True, True, PRECISION
    )
    dq, ds_sum = _window_bwd_dq_tiles(
        dq, ds_sum, *args, lo, hi, window, qk_scale, BT, BD, BV, True, HAS_MASK, False, True, PRECISION
    )
    dq, ds_sum = _window_bwd_dq_tiles(
        dq, ds_sum, *args, hi, n, window, qk_scale, BT, BD, BV, True, HAS_MASK, True, True, PRECISION
    )
    # c = max window logit: its gradient -r (the window logits' gradients sum to r) goes to the arg max key
    gamma = tl.load(GAMMA + i_h)
    r = gamma * ds_sum
    k_max = tl.load(K + idx[:, None] * stride_kt + d[None, :], mask=d[None, :] < D, other=0.0)
    dq = (gamma * dq - r[:, None] * k_max.to(tl.float32)) * scale
    dq_ptrs = DQ + i_b * stride_qb + i_h * stride_qh + i[:, None] * stride_qt + d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=q_mask)
    tl.store(R + rows, r, mask=i < Tq)
    tl.store(RSUM + rows, ds_sum, mask=i < Tq)

    # dq_feat = (h do - z delta) / den over the state, plus the band's da @ phi_k
    jb = p_min - window + 1 + tl.arange(0, BT)
    jb_in = (jb >= 0) & (jb < Tk)
    vb = tl.load(V + jb[:, None] * stride_vt + e[None, :], mask=jb_in[:, None] & (e[None, :] < Dv), other=0.0)
    band = (jb[None, :] <= off + i[:, None] - window) & (jb[None, :] >= 0)
    if HAS_MASK:
        band = band & _key_mask(M, jb, Tk)[None, :]
    da = tl.dot(do, tl.trans(vb), input_precision=PRECISION)  # [BT, BT]
    da = tl.where(band, rden[:, None] * (da - delta[:, None]), 0.0)
    chunk = i_bh.to(tl.int64) * NQ + i_m
    for f0 in range(0, F, BK):
        f = f0 + tl.arange(0, BK)
        h_mask = (f[:, None] < F) & (e[None, :] < Dv)
        h = tl.load(HS + chunk * F * Dv + f[:, None] * Dv + e[None, :], mask=h_mask, other=0.0)  # [BK, BV]
        z = tl.load(ZS + chunk * F + f, mask=f < F, other=0.0)
        kf = tl.load(KF + jb[:, None] * stride_kft + f[None, :], mask=jb_in[:, None] & (f[None, :] < F), other=0.0)
        dqf = tl.dot(do, tl.trans(h), input_precision=PRECISION)  # [BT, BK]
        dqf = rden[:, None] * (dqf - delta[:, None] * z[None, :])
        dqf = tl.dot(da.to(kf.dtype), kf, dqf, input_precision=PRECISION)
        tl.store(
            DQF + i_b * stride_qfb + i_h * stride_qfh + i[:, None] * stride_qft + f[None, :],
            dqf.to(DQF.dtype.element_ty), mask=(i[:, None] < Tq) & (f[None, :] < F),
        )


@triton.jit
def hybrid_bwd_dkv_kernel(
    Q, K, V, QF, KF, M, GAMMA, DO, LSE, DELTA, RDEN, R, IDX, DHS, DZS, DK, DV, DKF,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_qfb, stride_qft, stride_qfh, stride_kfb, stride_kft, stride_kfh, stride_dob, stride_dot, stride_doh,
    H, G, Tq, Tk, D, Dv, F, window, qk_scale, scale, b0, m_min, NQ,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk, dv (summed over the query heads of a kv head) and dk_feat of key chunk m = [b0 + m BT, b0 + (m + 1) BT):
    the window tiles of the query blocks that see it, the band of query block m, the state of the blocks after m."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    Hkv = H // G
    i_b, i_hk = (i_bh // Hkv).to(tl.int64), i_bh % Hkv
    off = Tk - Tq
    m = m_min + i_c
    n0 = b0 + m * BT
    j = n0 + tl.arange(0, BT)
    d = tl.arange(0, BD)
    e = tl.arange(0, BV)
    real_key = (j >= 0) & (j < Tk)
    k_ptrs = i_b * stride_kb + i_hk * stride_kh + j[:, None] * stride_kt + d[None, :]
    v_ptrs = i_b * stride_vb + i_hk * stride_vh + j[:, None] * stride_vt + e[None, :]
    k_mask = real_key[:, None] & (d[None, :] < D)
    v_mask = real_key[:, None] & (e[None, :] < Dv)
    k = tl.load(K + k_ptrs, mask=k_mask, other=0.0)
    v = tl.load(V + v_ptrs, mask=v_mask, other=0.0)
    if HAS_MASK:  # a padded key is seen by no query and is in no state
        real_key = real_key & _key_mask(M + i_b * Tk, j, Tk)

    start, n, lo, hi = _query_blocks(n0, off, Tq, window, BT, BT, True, SPLIT)
    ib = m * BT + tl.arange(0, BT)  # query block m: the band sees keys j <= p - window
    band = (j[:, None] <= off + ib[None, :] - window) & (ib[None, :] >= 0) & (ib[None, :] < Tq)  # [BT, BT]
    chunk = tl.minimum(tl.maximum(m, -1), NQ - 1) + 1  # dHS index: sum over the query blocks after m
    dk = tl.zeros([BT, BD], dtype=tl.float32)
    dv = tl.zeros([BT, BV], dtype=tl.float32)
    for g in range(G):
        i_h = i_hk * G + g
        rows = (i_b * H + i_h) * Tq
        Qh = Q + i_b * stride_qb + i_h * stride_qh
        DOh = DO + i_b * stride_dob + i_h * stride_doh
        gamma = tl.load(GAMMA + i_h)
        args = (k, v, j, gamma, Qh, DOh, LSE + rows, DELTA + rows, R + rows, IDX + rows, stride_qt, stride_dot, Tq,
                off, D, Dv, start)
        dk, dv = _window_bwd_dkv_tiles(
            dk, dv, *args, 0, lo, window, qk_scale, BT, BD, BV, True, True, True, PRECISION
        )
        dk, dv = _window_bwd_dkv_tiles(
            dk, dv, *args, lo, hi, window, qk_scale, BT, BD, BV, True, False, True, PRECISION
        )
        dk, dv = _window_bwd_dkv_tiles(
            dk, dv, *args, hi, n, window, qk_scale, BT, BD, BV, True, True, True, PRECISION
        )

        # band: a = phi_k . phi_q, da = (v . do - delta) / den
        q_in = (ib >= 0) & (ib < Tq)
        do = tl.load(DOh + ib[:, None] * stride_dot + e[None, :], mask=q_in[:, None] & (e[None, :] < Dv), other=0.0)
        rden = tl.load(RDEN + rows + ib, mask=q_in, other=0.0)
        delta = tl.load(DELTA + rows + ib, mask=q_in, other=0.0)
        da = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BT keys, BT queries]
        da = tl.where(band, (da - delta[None, :]) * rden[None, :], 0.0)
        a = tl.zeros([BT, BT], dtype=tl.float32)
        QFh = QF + i_b * stride_qfb + i_h * stride_qfh
        KFh = KF + i_b * stride_kfb + i_h * stride_kfh
        DKFh = DKF + i_b * stride_kfb + i_h * stride_kfh
        state = (i_b * H + i_h) * (NQ + 1) + chunk
        for f0 in range(0, F, BK):
            f = f0 + tl.arange(0, BK)
            qf = tl.load(QFh + ib[:, None] * stride_qft + f[None, :], mask=q_in[:, None] & (f[None, :] < F), other=0.0)
            kf_mask = real_key[:, None] & (f[None, :] < F)
            kf = tl.load(KFh + j[:, None] * stride_kft + f[None, :], mask=kf_mask, other=0.0)
            dh_mask = (f[:, None] < F) & (e[None, :] < Dv)
            dh = tl.load(DHS + state * F * Dv + f[:, None] * Dv + e[None, :], mask=dh_mask, other=0.0)  # [BK, BV]
            dz = tl.load(DZS + state * F + f, mask=f < F, other=0.0)
            a = tl.dot(kf, tl.trans(qf), a, input_precision=PRECISION)
            dv = tl.dot(kf, dh, dv, input_precision=PRECISION)
            dkf = tl.dot(v, tl.trans(dh), input_precision=PRECISION) - dz[None, :]  # [BT, BK]
            dkf = tl.dot(da.to(qf.dtype), qf, dkf, input_precision=PRECISION)
            tl.store(DKFh + j[:, None] * stride_kft + f[None, :], tl.where(kf_mask, dkf, 0.0).to(DKF.dtype.element_ty),
                     mask=(j[:, None] >= 0) & (j[:, None] < Tk) & (f[None, :] < F))
        a = tl.where(band, a * rden[None, :], 0.0)
        dv = tl.dot(a.to(do.dtype), do, dv, input_precision=PRECISION)
    dk = tl.where(real_key[:, None], dk * scale, 0.0)
    dv = tl.where(real_key[:, None], dv, 0.0)
    tl.store(DK + k_ptrs, dk.to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + v_ptrs, dv.to(DV.dtype.element_ty), mask=v_mask)


@triton.jit
def hybrid_decode_kernel(
    Q, K, V, QF, KF, M, GAMMA, H0, Z0, O, HT, ZT,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_qfb, stride_qfh, stride_kfb, stride_kft, stride_kfh, stride_ob, stride_oh,
    H, G, Tk, D, Dv, F, window, qk_scale,
    BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_INIT: tl.constexpr, OUTPUT_FINAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """One query (at key position Tk - 1): softmax over keys [Tk - window, Tk) + phi_q . (state of the older keys);
    the final state also folds key Tk - window, which leaves the next query's window."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    d = tl.arange(0, BD)
    e = i_v * BV + tl.arange(0, BV)
    K += i_b * stride_kb + (i_h // G) * stride_kh
    V += i_b * stride_vb + (i_h // G) * stride_vh
    KF += i_b * stride_kfb + i_h * stride_kfh
    QF += i_b * stride_qfb + i_h * stride_qfh
    M += i_b * Tk

    q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + d, mask=d < D, other=0.0).to(tl.float32)
    acc = tl.zeros([BV], dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    m_i = tl.full([1], NEG_BIG, dtype=tl.float32)
    for j0 in range(tl.maximum(Tk - window, 0), Tk, BN):
        j = j0 + tl.arange(0, BN)
        k = tl.load(K + j[:, None] * stride_kt + d[None, :], mask=(j[:, None] < Tk) & (d[None, :] < D), other=0.0)
        v = tl.load(V + j[:, None] * stride_vt + e[None, :], mask=(j[:, None] < Tk) & (e[None, :] < Dv), other=0.0)
        s = tl.sum(q[None, :] * k.to(tl.float32), 1) * qk_scale  # [BN]
        visible = j < Tk
        if HAS_MASK:
            visible = visible & _key_mask(M, j, Tk)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(prob, 0)
        acc = acc * alpha + tl.sum(prob[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    gamma = tl.load(GAMMA + i_h)
    acc *= gamma
    l_i *= gamma

    older = Tk - window  # keys [0, older) are in the state this query reads
    for f0 in range(0, F, BK):
        f = f0 + tl.arange(0, BK)
        state = i_bh.to(tl.int64) * F * Dv + f[:, None] * Dv + e[None, :]
        state_mask = (f[:, None] < F) & (e[None, :] < Dv)
        if HAS_INIT:
            kv = tl.load(H0 + state, mask=state_mask, other=0.0)
            z = tl.load(Z0 + i_bh.to(tl.int64) * F + f, mask=f < F, other=0.0)
        else:
            kv = tl.zeros([BK, BV], dtype=tl.float32)
            z = tl.zeros([BK], dtype=tl.float32)
        for j0 in range(0, older, BN):  # only when more than window keys are passed
            j = j0 + tl.arange(0, BN)
            fold = j < older
            if HAS_MASK:
                fold = fold & _key_mask(M, j, Tk)
            kf = tl.load(KF + j[None, :] * stride_kft + f[:, None], mask=fold[None, :] & (f[:, None] < F), other=0.0)
            v = tl.load(V + j[:, None] * stride_vt + e[None, :], mask=fold[:, None] & (e[None, :] < Dv), other=0.0)
            kv = tl.dot(kf, v, kv, input_precision=PRECISION)
            z += tl.sum(kf.to(tl.float32), 1)
        qf = tl.load(QF + f, mask=f < F, other=0.0).to(tl.float32)
        acc += tl.sum(qf[:, None] * kv, 0)
        l_i += tl.sum(qf * z, 0)
        if OUTPUT_FINAL:
            fold = (older >= 0) & (f < F)
            if HAS_MASK:
                fold = fold & (tl.load(M + older, mask=older >= 0, other=0) != 0)
            kf = tl.load(KF + older * stride_kft + f, mask=fold, other=0.0).to(tl.float32)
            v = tl.load(V + older * stride_vt + e, mask=(older >= 0) & (e < Dv), other=0.0).to(tl.float32)
            tl.store(HT + state, kv + kf[:, None] * v[None, :], mask=state_mask)
            tl.store(ZT + i_bh.to(tl.int64) * F + f, z + kf, mask=(f < F) & (i_v == 0))
    o = acc / tl.maximum(l_i, TINY)
    tl.store(O + i_b * stride_ob + i_h * stride_oh + e, o.to(O.dtype.element_ty), mask=e < Dv)


# --- host side ------------------------------------------------------------------------------------------------------


def _pow2(n: int, cap: int | None = None) -> int:
    """Power-of-2 block size >= 16 (tl.dot's minimum) covering n, at most cap."""
    size = max(16, triton.next_power_of_2(n))
    return size if cap is None else min(size, cap)


def _num_warps(head_dim_block: int) -> int:
    return 4 if head_dim_block <= 64 else 8


def _split(window) -> bool:
    """Loop apart over the tiles that need no causal/window mask only when there are many of them: with a few
    tiles per program, one pipelined loop is faster (H200, window 128: 1.95 ms fwd+bwd against 2.15)."""
    return window is None or window > SPLIT_WINDOW


def _softmax_blocks(q_len, window, head_dim_block):
    """(BM, BN, num_warps): long key ranges take larger query blocks; short windows waste less with smaller ones."""
    if _split(window):
        return _pow2(q_len, BLOCK_M_FULL), BLOCK_N, _num_warps(head_dim_block)
    return _pow2(q_len, BLOCK_M), BLOCK_N, 4


def _unit_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1; the other dims go through strides."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself if its last dim has stride 1 and its elements fill their memory span (then empty_like(x), where
    the gradients go, has x's strides and the kernels can index both alike); else a contiguous copy."""
    x = _unit_last_dim(x)
    span = 1
    for stride, size in sorted((s, n) for s, n in zip(x.stride(), x.shape) if n > 1):
        if stride != span:
            return x.contiguous()
        span *= size
    return x


def _hybrid_on_reference(q, dtype) -> bool:
    """fp32 hybrid attention on a GPU runs the reference: with the default blocks Triton 3.6 fails to compile the fp32
    (ieee) hybrid kernels on an H200 ("PassManager::run failed"). The interpreter (CPU) runs them, for the tests."""
    return dtype is None or (dtype == torch.float32 and q.is_cuda)


def _precision(dtype) -> str:
    """fp32 operands multiply in full fp32 (tests compare at 1e-5), 16-bit ones on the tensor cores anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _key_mask_arg(key_mask, like):
    return (like, False) if key_mask is None else ((key_mask != 0).to(torch.int8).contiguous(), True)


def _strides(*tensors):
    """(batch, time, head) strides of [B, T, H, D] tensors."""
    return [s for t in tensors for s in t.stride()[:3]]


def _window_attn_fwd(q, k, v, window, key_mask, scale):
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    BD, BV = _pow2(D), _pow2(Dv)
    BM, BN, num_warps = _softmax_blocks(Tq, window, max(BD, BV))
    o = torch.empty(B, Tq, H, Dv, dtype=v.dtype, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    mask, has_mask = _key_mask_arg(key_mask, q)
    window_attn_fwd_kernel[(triton.cdiv(Tq, BM), B * H)](
        q, k, v, mask, o, lse, *_strides(q, k, v, o),
        H, H // Hkv, Tq, Tk, D, Dv, window or 0, scale * LOG2E,
        BM=BM, BN=BN, BD=BD, BV=BV, WINDOW=window is not None, HAS_MASK=has_mask, SPLIT=_split(window),
        PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=NUM_STAGES,
    )
    return o, lse


def _window_attn_bwd(q, k, v, o, lse, do, window, key_mask, scale):
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    BD, BV = _pow2(D), _pow2(Dv)
    BM, BN, num_warps = _softmax_blocks(Tq, window, max(BD, BV))
    delta = torch.empty_like(lse)  # written by the dq kernel, read by the dk/dv kernel
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask, has_mask = _key_mask_arg(key_mask, q)
    common = dict(BM=BM, BN=BN, BD=BD, BV=BV, WINDOW=window is not None, HAS_MASK=has_mask, SPLIT=_split(window),
                  PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=NUM_STAGES)
    sizes = (H, H // Hkv, Tq, Tk, D, Dv, window or 0, scale * LOG2E, scale)
    window_attn_bwd_dq_kernel[(triton.cdiv(Tq, BM), B * H)](
        q, k, v, mask, o, do, lse, delta, dq, *_strides(q, k, v, o, do), *sizes, **common
    )
    window_attn_bwd_dkv_kernel[(triton.cdiv(Tk, BN), B * Hkv)](
        q, k, v, mask, do, lse, delta, dk, dv, *_strides(q, k, v, do), *sizes, **common
    )
    return dq, dk, dv


class WindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, key_mask, scale):
        o, lse = _window_attn_fwd(q, k, v, window, key_mask, scale)
        ctx.save_for_backward(q, k, v, o, lse, key_mask)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_mask = ctx.saved_tensors
        dq, dk, dv = _window_attn_bwd(q, k, v, o, lse, _unit_last_dim(do), ctx.window, key_mask, ctx.scale)
        return dq, dk, dv, None, None, None


def softmax_attention(q, k, v, window=None, key_mask=None, scale=None):
    """Triton twin of hf_based.kernels.softmax_attention.softmax_attention (same arguments, result, errors)."""
    check_attention_inputs(q, k, v, key_mask)
    if window is not None:
        check_window(window)
    dtype = kernel_dtype(q, k, v)
    if dtype is None:
        return softmax_attention_reference(q, k, v, window, key_mask, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    q, k, v = (_kernel_layout(x.to(dtype)) for x in (q, k, v))
    return WindowAttentionFunction.apply(q, k, v, window, key_mask, scale).to(out_dtype)


def _hybrid_layout(q, k, window):
    """-> (BT, NQ, b0, m_min): query blocks of BT; key chunk m starts at b0 + m BT, m_min is the first holding keys."""
    Tq, Tk = q.shape[1], k.shape[1]
    BT = _pow2(Tq, BLOCK_T)
    b0 = Tk - Tq - window + 1
    return BT, triton.cdiv(Tq, BT), b0, -triton.cdiv(max(b0, 0), BT)


def _hybrid_state(kf, v, key_mask, kv0, z0, window, BT, NQ, b0, m_min, store_states, output_final):
    """hybrid_state_fwd_kernel: (HS [B, H, NQ, F, Dv], ZS [B, H, NQ, F]) if store_states; (kv, z) final if asked."""
    B, Tk, H, F = kf.shape
    Hkv, Dv = v.shape[2], v.shape[-1]
    BK, BV = _pow2(F, BLOCK_K), _pow2(Dv, BLOCK_V)
    hs = kf.new_empty(B, H, NQ if store_states else 0, F, Dv)
    zs = kf.new_empty(B, H, NQ if store_states else 0, F, dtype=torch.float32)
    final = (kf.new_empty(B, H, F, Dv, dtype=torch.float32), kf.new_empty(B, H, F, dtype=torch.float32))
    mask, has_mask = _key_mask_arg(key_mask, kf)
    hybrid_state_fwd_kernel[(triton.cdiv(F, BK), triton.cdiv(Dv, BV), B * H)](
        kf, v, mask, kv0 if kv0 is not None else kf, z0 if z0 is not None else kf, hs, zs, *final,
        *_strides(kf, v), H, H // Hkv, Tk, F, Dv, b0, m_min, NQ, max(Tk - window + 1, 0),
        BT=BT, BK=BK, BV=BV, HAS_MASK=has_mask, HAS_INIT=kv0 is not None, STORE_STATES=store_states,
        OUTPUT_FINAL=output_final, PRECISION=_precision(kf.dtype), num_warps=4, num_stages=NUM_STAGES,
    )
    return (hs, zs), (final if output_final else None)


def _hybrid_fwd(q, k, v, qf, kf, gamma, kv0, z0, window, key_mask, scale, output_final_state, keep_fp32):
    """-> o, o in fp32 (o itself if fp32; None unless keep_fp32), c, den, idx [B, H, Tq], final state or None."""
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv, F = k.shape[1], k.shape[2], v.shape[-1], qf.shape[-1]
    BT, NQ, b0, m_min = _hybrid_layout(q, k, window)
    (hs, zs), final = _hybrid_state(kf, v, key_mask, kv0, z0, window, BT, NQ, b0, m_min, True, output_final_state)
    o = torch.empty(B, Tq, H, Dv, dtype=v.dtype, device=q.device)
    o32 = o if o.dtype == torch.float32 else (torch.empty_like(o, dtype=torch.float32) if keep_fp32 else None)
    c, den = (torch.empty(B, H, Tq, dtype=torch.float32, device=q.device) for _ in range(2))
    idx = torch.empty(B, H, Tq, dtype=torch.int32, device=q.device)
    mask, has_mask = _key_mask_arg(key_mask, q)
    BD, BV = _pow2(D), _pow2(Dv)
    hybrid_fwd_kernel[(NQ, B * H)](
        q, k, v, qf, kf, mask, gamma, hs, zs, o, o if o32 is None else o32, c, den, idx, *_strides(q, k, v, qf, kf, o),
        H, H // Hkv, Tq, Tk, D, Dv, F, window, scale * LOG2E,
        BT=BT, BD=BD, BV=BV, BK=_pow2(F, BLOCK_K), HAS_MASK=has_mask, SPLIT=_split(window),
        STORE_O32=o32 is not None and o32 is not o, PRECISION=_precision(q.dtype), num_warps=HYBRID_NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return o, o32, c, den, idx, final


def _hybrid_bwd(q, k, v, qf, kf, gamma, kv0, z0, o32, c, den, idx, do, window, key_mask, scale, init_grad):
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv, F = k.shape[1], k.shape[2], v.shape[-1], qf.shape[-1]
    BT, NQ, b0, m_min = _hybrid_layout(q, k, window)
    BD, BV, BK = _pow2(D), _pow2(Dv), _pow2(F, BLOCK_K)
    (hs, zs), _ = _hybrid_state(kf, v, key_mask, kv0, z0, window, BT, NQ, b0, m_min, True, False)
    lse, delta, rden, r, ds_sum = (torch.empty_like(den) for _ in range(5))  # per query row, from the dq kernel
    dq, dk, dv, dqf, dkf = (torch.empty_like(x) for x in (q, k, v, qf, kf))
    mask, has_mask = _key_mask_arg(key_mask, q)
    common = dict(BT=BT, BD=BD, BV=BV, BK=BK, HAS_MASK=has_mask, SPLIT=_split(window), PRECISION=_precision(q.dtype),
                  num_warps=HYBRID_NUM_WARPS, num_stages=NUM_STAGES)
    sizes = (H, H // Hkv, Tq, Tk, D, Dv, F, window, scale * LOG2E, scale)
    hybrid_bwd_dq_kernel[(NQ, B * H)](
        q, k, v, qf, kf, mask, gamma, o32, do, c, den, idx, hs, zs, lse, delta, rden, dq, dqf, r, ds_sum,
        *_strides(q, k, v, qf, kf, o32, do), *sizes, **common,
    )

    dhs = qf.new_empty(B, H, NQ + 1, F, Dv)
    dzs = qf.new_empty(B, H, NQ + 1, F, dtype=torch.float32)
    d_init = (qf.new_empty(B, H, F, Dv, dtype=torch.float32), qf.new_empty(B, H, F, dtype=torch.float32))
    BVs = _pow2(Dv, BLOCK_V)
    hybrid_state_bwd_kernel[(triton.cdiv(F, BK), triton.cdiv(Dv, BVs), B * H)](
        qf, do, rden, delta, dhs, dzs, *d_init, *_strides(qf, do), H, Tq, F, Dv, NQ,
        BT=BT, BK=BK, BV=BVs, OUTPUT_INIT_GRAD=init_grad, PRECISION=_precision(q.dtype), num_warps=4,
        num_stages=NUM_STAGES,
    )

    n_chunks = triton.cdiv(Tk - b0, BT) - m_min  # key chunks m_min .. covering [0, Tk)
    hybrid_bwd_dkv_kernel[(n_chunks, B * Hkv)](
        q, k, v, qf, kf, mask, gamma, do, lse, delta, rden, r, idx, dhs, dzs, dk, dv, dkf,
        *_strides(q, k, v, qf, kf, do), *sizes, b0, m_min, NQ, **common,
    )
    d_gamma = ds_sum.sum((0, 2)).to(gamma.dtype)  # d gamma_h = sum over the window of exp(s - c) d a
    return dq, dk, dv, dqf, dkf, d_gamma, (d_init if init_grad else (None, None))


class HybridAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_feat, k_feat, gamma, kv0, z0, window, key_mask, scale, output_final_state):
        o, o32, c, den, idx, final = _hybrid_fwd(
            q, k, v, q_feat, k_feat, gamma, kv0, z0, window, key_mask, scale, output_final_state,
            keep_fp32=any(ctx.needs_input_grad),
        )
        ctx.save_for_backward(q, k, v, q_feat, k_feat, gamma, kv0, z0, key_mask, o32, c, den, idx)
        ctx.window, ctx.scale = window, scale
        ctx.set_materialize_grads(False)
        return (o, *final) if output_final_state else o

    @staticmethod
    def backward(ctx, do, *d_final):
        if any(g is not None for g in d_final):
            raise NotImplementedError("hybrid_attention (Triton): no gradient through the returned final_state")
        q, k, v, q_feat, k_feat, gamma, kv0, z0, key_mask, o32, c, den, idx = ctx.saved_tensors
        if do is None:
            return (None,) * 12
        init_grad = kv0 is not None and (ctx.needs_input_grad[6] or ctx.needs_input_grad[7])
        dq, dk, dv, dqf, dkf, d_gamma, (d_kv0, d_z0) = _hybrid_bwd(
            q, k, v, q_feat, k_feat, gamma, kv0, z0, o32, c, den, idx, _unit_last_dim(do), ctx.window, key_mask,
            ctx.scale, init_grad,
        )
        return dq, dk, dv, dqf, dkf, d_gamma, d_kv0, d_z0, None, None, None, None


def _check_hybrid(q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state):
    """The reference's checks (same errors); -> the initial state in fp32, or (None, None)."""
    check_attention_inputs(q, k, v, key_mask)
    check_window(window)
    batch, q_len, heads, _ = q.shape
    features = check_shape("q_feat", q_feat, "batch, time, heads, features", (batch, q_len, heads, None))[-1]
    check_shape("k_feat", k_feat, "batch, time, heads, features", (batch, k.shape[1], heads, features))
    check_shape("window_factor", window_factor, "heads", (heads,))
    if initial_state is None:
        return None, None
    return prepare_state(initial_state, batch, heads, features, v.shape[-1], torch.float32, q.device)


def hybrid_attention(
    q, k, v, q_feat, k_feat, window_factor, window, key_mask=None, initial_state=None, output_final_state=False,
    scale=None,
):
    """Triton twin of hf_based.kernels.hybrid_attention.hybrid_attention (same arguments, result, errors)."""
    kv0, z0 = _check_hybrid(q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state)
    dtype = kernel_dtype(q, k, v, q_feat, k_feat)
    if _hybrid_on_reference(q, dtype):
        return hybrid_attention_reference(
            q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state, output_final_state, scale
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    q, k, v, q_feat, k_feat = (_kernel_layout(x.to(dtype)) for x in (q, k, v, q_feat, k_feat))
    gamma = window_factor.float()
    kv0, z0 = (None, None) if kv0 is None else (kv0.contiguous(), z0.contiguous())
    out = HybridAttentionFunction.apply(
        q, k, v, q_feat, k_feat, gamma, kv0, z0, window, key_mask, scale, output_final_state
    )
    if output_final_state:
        return out[0].to(out_dtype), (out[1], out[2])
    return out.to(out_dtype), None


def hybrid_attention_recurrent(
    q, k, v, q_feat, k_feat, window_factor, window, key_mask=None, initial_state=None, output_final_state=False,
    scale=None,
):
    """Triton twin of hf_based.kernels.hybrid_attention.hybrid_attention_recurrent: one fused kernel for the decode
    step (Tq = 1, no gradients); the parallel op otherwise (same math)."""
    kv0, z0 = _check_hybrid(q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state)
    dtype = kernel_dtype(q, k, v, q_feat, k_feat)
    tensors = (q, k, v, q_feat, k_feat, window_factor, *(initial_state or ()))
    if q.shape[1] != 1 or _hybrid_on_reference(q, dtype) or (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    ):
        return hybrid_attention(
            q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state, output_final_state, scale
        )
    B, _, H, D = q.shape
    Tk, Hkv, Dv, F = k.shape[1], k.shape[2], v.shape[-1], q_feat.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    q, k, v, q_feat, k_feat = (_kernel_layout(x.to(dtype)) for x in (q, k, v, q_feat, k_feat))
    o = torch.empty(B, 1, H, Dv, dtype=v.dtype, device=q.device)
    final = (q.new_empty(B, H, F, Dv, dtype=torch.float32), q.new_empty(B, H, F, dtype=torch.float32))
    mask, has_mask = _key_mask_arg(key_mask, q)
    BV = _pow2(Dv, BLOCK_V)
    hybrid_decode_kernel[(triton.cdiv(Dv, BV), B * H)](
        q, k, v, q_feat, k_feat, mask, window_factor.float(), kv0 if kv0 is not None else q,
        z0 if z0 is not None else q, o, *final,
        q.stride(0), q.stride(2), *_strides(k, v), q_feat.stride(0), q_feat.stride(2), *_strides(k_feat),
        o.stride(0), o.stride(2), H, H // Hkv, Tk, D, Dv, F, window, scale * LOG2E,
        BN=BLOCK_DECODE, BD=_pow2(D), BV=BV, BK=_pow2(F, BLOCK_K), HAS_MASK=has_mask, HAS_INIT=kv0 is not None,
        OUTPUT_FINAL=output_final_state, PRECISION=_precision(q.dtype), num_warps=4,
    )
    return o.to(out_dtype), (final if output_final_state else None)
