"""Triton LoLCATs hybrid attention (sliding-window softmax + linear attention) for [batch, time, heads, dim] tensors.

Same signatures and semantics as the references `hybrid_attention(_recurrent)` (hf_based/kernels/hybrid/reference.py):
the Tq queries are the last Tq of the Tk keys (query i sits at key position p = Tk - Tq + i), query head h reads kv
head h // (H // Hkv), outputs come back in v.dtype and states in fp32.

hybrid_attention cuts the keys of query block m (queries [m BT, (m + 1) BT)) at b_m = Tk - Tq + m BT - window + 1,
where the window of its first query starts:
- keys j < b_m are older than the window of every query in the block: a chunked scan over key chunks
  [b_m, b_m + BT) (the query grid shifted by b_0) gives the linear state HS[m] = kv0 + sum_{j < b_m} phi_k v_j^T;
- keys [b_m, b_m + BT) are older than the window of some of them (j <= p - window): one quadratic band tile;
- the window keys [p - window + 1, p] go through the online softmax of the softmax kernels (their window tiles), which
  also keep c, each query's max window logit, and its arg max.
The backward mirrors it: a reverse scan gives key chunk m the sum over the later query blocks of
phi_q(q_i) (do_i / den_i)^T, and the gradient of c, which torch's amax hands to the arg max key, is folded into the
window tiles.
"""

import functools

import torch
import triton
import triton.language as tl

from hf_based.kernels._checks import check_attention_inputs, check_shape, check_window, kernel_dtype, prepare_state
from hf_based.kernels.hybrid.chunked import first_positions, hybrid_attention_chunked
from hf_based.kernels.hybrid.reference import check_late_arguments, with_late_sinks, with_sink_index
from hf_based.kernels.hybrid.reference import hybrid_attention as hybrid_attention_reference
from hf_based.kernels.softmax.triton import (
    LOG2E,
    NEG_BIG,
    NUM_STAGES,
    key_blocks,
    key_mask_arg,
    key_splits,
    load_key_mask,
    online_softmax_tile,
    query_blocks,
    softmax_bwd_dkv_tiles,
    softmax_bwd_dq_tiles,
    softmax_fwd_tiles,
    split_loops,
    split_range,
)
from hf_based.kernels.triton_utils import (
    block_size,
    bth_strides,
    cdiv,
    dot_precision,
    kernel_layout,
    needs_grad,
    unit_last_dim,
    use_decode_kernel,
)

# Block sizes (powers of 2, >= 16). Tests shrink them so that small problems cover several blocks.
BLOCK_T = 64  # queries per program = keys per linear-state chunk
BLOCK_K = 64  # feature chunk
BLOCK_V = 64  # state scans and decode: value columns per program
BLOCK_DECODE = 64  # decode: keys per tile
BLOCK_SINKS = 64  # forward: sinks per tile
NUM_WARPS = 4  # H200, hd 128, F 128, window 64: 4.7 ms fwd+bwd against 7.7 with 8 warps

TINY = tl.constexpr(torch.finfo(torch.float32).tiny)  # the reference's denominator clamp


# --- kernels ----------------------------------------------------------------------------------------------------------


@triton.jit
def hybrid_state_fwd_kernel(
    KF, V, M, H0, Z0, HS, ZS, HT, ZT,
    stride_kfb, stride_kft, stride_kfh, stride_vb, stride_vt, stride_vh,
    H, G, Tk, F, Dv, b0, m_min, NQ, fold_end, segment_chunks,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr,
    STORE_STATES: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """HS[b, h, m] = kv0 + sum_{0 <= j < b0 + m BT} phi_k(k_j) v_j^T (ZS: of phi_k(k_j)) for m in [0, NQ): the keys
    older than the window of every query of block m; the final state folds keys [0, fold_end).

    With SEGMENTS, axis 2 runs over (segment, b * H + h): segment s scans only chunks m_min + [s, s + 1) *
    segment_chunks from a zero state (kv0 for s = 0), so HS holds sums within the segment, and its whole sum goes to
    HT and ZT ([segments, B, H, ...]); the caller adds the earlier segments' sums (sequence parallelism, for few
    heads)."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m_end = NQ
    initial_rows = F  # of kv0 and z0: none but in the first segment
    if SEGMENTS:
        n_bh = tl.num_programs(2) // tl.cdiv(NQ - m_min, segment_chunks)
        segment, i_bh = i_bh // n_bh, i_bh % n_bh
        m_min += segment * segment_chunks
        m_end = tl.minimum(m_min + segment_chunks, NQ)
        initial_rows = tl.where(segment == 0, F, 0)
        HT += segment.to(tl.int64) * n_bh * F * Dv
        ZT += segment.to(tl.int64) * n_bh * F
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    f = i_k * BK + tl.arange(0, BK)
    e = i_v * BV + tl.arange(0, BV)
    KF += i_b * stride_kfb + i_h * stride_kfh
    V += i_b * stride_vb + (i_h // G) * stride_vh
    M += i_b * Tk
    state = i_bh.to(tl.int64) * F * Dv + f[:, None] * Dv + e[None, :]
    state_mask = (f[:, None] < F) & (e[None, :] < Dv)
    if HAS_INITIAL_STATE:
        kv = tl.load(H0 + state, mask=(f[:, None] < initial_rows) & (e[None, :] < Dv), other=0.0)  # [BK, BV]
        z = tl.load(Z0 + i_bh.to(tl.int64) * F + f, mask=f < initial_rows, other=0.0)  # [BK]
    else:
        kv = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
    for m in range(m_min, m_end):  # chunk m holds keys [b0 + m BT, b0 + (m + 1) BT); m < 0: keys before the queries'
        if STORE_STATES:
            chunk = (i_bh.to(tl.int64) * NQ + m) * F * Dv
            tl.store(HS + chunk + f[:, None] * Dv + e[None, :], kv.to(HS.dtype.element_ty), mask=state_mask & (m >= 0))
            if i_v == 0:
                tl.store(ZS + (i_bh.to(tl.int64) * NQ + m) * F + f, z, mask=(f < F) & (m >= 0))
        j = b0 + m * BT + tl.arange(0, BT)
        fold = (j >= 0) & (j < fold_end)
        if HAS_MASK:
            fold = fold & load_key_mask(M, j, Tk)
        kf = tl.load(KF + j[None, :] * stride_kft + f[:, None], mask=fold[None, :] & (f[:, None] < F), other=0.0)
        v = tl.load(V + j[:, None] * stride_vt + e[None, :], mask=fold[:, None] & (e[None, :] < Dv), other=0.0)
        kv = tl.dot(kf, v, kv, input_precision=DOT_PRECISION)  # [BK, BT] @ [BT, BV]
        z += tl.sum(kf.to(tl.float32), 1)
    if STORE_FINAL_STATE or SEGMENTS:
        tl.store(HT + state, kv, mask=state_mask)
        if i_v == 0:
            tl.store(ZT + i_bh.to(tl.int64) * F + f, z, mask=f < F)


@triton.jit
def sink_tiles(
    acc, l_i, m_i, rows, s_lo, s_hi, q, p, SP, K, V, stride_kt, stride_vt, Tk, D, Dv, window, qk_scale,
    BS: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Sinks [s_lo, s_hi) of a row (key positions SP, outside [0, Tk) for none; their keys and values read from the
    row's K and V) into the online softmax of the queries at key positions p where `rows` holds, for those the sink
    is older than the window of."""
    d = tl.arange(0, BD)
    e = tl.arange(0, BV)
    for s0 in range(s_lo, s_hi, BS):
        js = s0 + tl.arange(0, BS)
        pos = tl.load(SP + js, mask=js < s_hi, other=-1)
        listed = (pos >= 0) & (pos < Tk)
        row = pos.to(tl.int64)[:, None]
        sk = tl.load(K + row * stride_kt + d[None, :], mask=listed[:, None] & (d[None, :] < D), other=0.0)
        sv = tl.load(V + row * stride_vt + e[None, :], mask=listed[:, None] & (e[None, :] < Dv), other=0.0)
        s = tl.dot(q, tl.trans(sk), input_precision=DOT_PRECISION) * qk_scale  # [BT, BS]
        seen = rows[:, None] & listed[None, :] & (pos[None, :] <= p[:, None] - window)
        acc, l_i, m_i = online_softmax_tile(acc, l_i, m_i, tl.where(seen, s, float("-inf")), sv, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def hybrid_fwd_kernel(
    Q, K, V, QF, KF, M, WINDOW_FACTOR, HS, ZS, O, O32, C, DEN, IDX, SP,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_qfb, stride_qft, stride_qfh, stride_kfb, stride_kft, stride_kfh, stride_ob, stride_ot, stride_oh,
    H, G, Tq, Tk, D, Dv, F, S, S_EARLY, LATE, window, qk_scale,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_FEATURES: tl.constexpr, SPLIT: tl.constexpr,
    STORE_O32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """O = num / den of query block m; O32 (same layout as O) keeps it in fp32 for the backward's do . o, whose
    rounding the gradient of the window factor w would amplify: d o / d w = (window average - o) * (window weight)
    / den. With HAS_SINKS (forward only: C and IDX then leave them out), the softmax also runs over the S sinks of
    the row, the keys at positions SP [B, S] (-1: none), for the queries they are older than the window of; the host
    zeroes their features. The queries from LATE on (late queries; Tq: none) see sinks
    [S_EARLY, S) instead of [0, S_EARLY). Without HAS_FEATURES (F = 0) there is no linear part."""
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
    start, n, lo, hi = key_blocks(p_min, p_max, window, BT, True, SPLIT)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    l_i = tl.zeros([BT], dtype=tl.float32)
    m_i = tl.full([BT], NEG_BIG, dtype=tl.float32)
    idx = tl.zeros([BT], dtype=tl.int32)
    args = (q, off + i, K, V, M, stride_kt, stride_vt, Tk, D, Dv, start)
    acc, l_i, m_i, idx = softmax_fwd_tiles(
        acc, l_i, m_i, idx, *args, 0, lo, window, qk_scale, BT, BD, BV, True, HAS_MASK, True, True, DOT_PRECISION
    )
    acc, l_i, m_i, idx = softmax_fwd_tiles(
        acc, l_i, m_i, idx, *args, lo, hi, window, qk_scale, BT, BD, BV, True, HAS_MASK, False, True, DOT_PRECISION
    )
    acc, l_i, m_i, idx = softmax_fwd_tiles(
        acc, l_i, m_i, idx, *args, hi, n, window, qk_scale, BT, BD, BV, True, HAS_MASK, True, True, DOT_PRECISION
    )
    if HAS_SINKS:  # sinks [0, S_EARLY) for the queries before LATE, [S_EARLY, S) for the others
        SP += i_b * S
        sinks = (q, off + i, SP, K, V, stride_kt, stride_vt, Tk, D, Dv, window, qk_scale)
        if i_m * BT < LATE:
            acc, l_i, m_i = sink_tiles(acc, l_i, m_i, i < LATE, 0, S_EARLY, *sinks, BS, BD, BV, DOT_PRECISION)
        if i_m * BT + BT > LATE:
            acc, l_i, m_i = sink_tiles(acc, l_i, m_i, i >= LATE, S_EARLY, S, *sinks, BS, BD, BV, DOT_PRECISION)
    c = tl.where(l_i > 0, m_i, 0.0)  # an empty window has no c: 0 keeps the backward's exp2(s - c) finite
    window_factor = tl.load(WINDOW_FACTOR + i_h)
    acc *= window_factor
    l_i *= window_factor

    if HAS_FEATURES:  # linear part: the state of keys < b_m, then the band of keys [b_m, b_m + BT) older than the window
        jb = p_min - window + 1 + tl.arange(0, BT)
        jb_in = (jb >= 0) & (jb < Tk)
        chunk = i_bh.to(tl.int64) * NQ + i_m
        a = tl.zeros([BT, BT], dtype=tl.float32)
        # not pipelined: Triton 3.6 miscompiles this loop pipelined on Hopper (wrong outputs; benchmarks/NOTES.md)
        for f0 in tl.range(0, F, BK, num_stages=1):
            f = f0 + tl.arange(0, BK)
            qf_mask = (i[:, None] < Tq) & (f[None, :] < F)
            qf = tl.load(QF + i[:, None] * stride_qft + f[None, :], mask=qf_mask, other=0.0)
            kf = tl.load(KF + jb[:, None] * stride_kft + f[None, :], mask=jb_in[:, None] & (f[None, :] < F), other=0.0)
            h_mask = (f[:, None] < F) & (e[None, :] < Dv)
            h = tl.load(HS + chunk * F * Dv + f[:, None] * Dv + e[None, :], mask=h_mask, other=0.0)  # [BK, BV]
            z = tl.load(ZS + chunk * F + f, mask=f < F, other=0.0)
            acc = tl.dot(qf, h, acc, input_precision=DOT_PRECISION)
            l_i += tl.sum(qf.to(tl.float32) * z[None, :], 1)
            a = tl.dot(qf, tl.trans(kf), a, input_precision=DOT_PRECISION)  # [BT, BT]
        band = (jb[None, :] <= off + i[:, None] - window) & (jb[None, :] >= 0)
        if HAS_MASK:
            band = band & load_key_mask(M, jb, Tk)[None, :]
        a = tl.where(band, a, 0.0)
        vb = tl.load(V + jb[:, None] * stride_vt + e[None, :], mask=jb_in[:, None] & (e[None, :] < Dv), other=0.0)
        acc = tl.dot(a.to(vb.dtype), vb, acc, input_precision=DOT_PRECISION)
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
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STORE_INITIAL_STATE_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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
        if i_v == 0:
            tl.store(DZS + chunk * F + f, dz, mask=f < F)
        i = m * BT + tl.arange(0, BT)
        real = (i >= 0) & (i < Tq)
        qf = tl.load(QF + i[None, :] * stride_qft + f[:, None], mask=real[None, :] & (f[:, None] < F), other=0.0)
        do = tl.load(DO + i[:, None] * stride_dot + e[None, :], mask=real[:, None] & (e[None, :] < Dv), other=0.0)
        rden = tl.load(RDEN + i_bh.to(tl.int64) * Tq + i, mask=real, other=0.0)
        delta = tl.load(DELTA + i_bh.to(tl.int64) * Tq + i, mask=real, other=0.0)
        dh = tl.dot(qf, (do * rden[:, None]).to(qf.dtype), dh, input_precision=DOT_PRECISION)  # [BK, BT] @ [BT, BV]
        dz += tl.sum(qf.to(tl.float32) * (rden * delta)[None, :], 1)
    if STORE_INITIAL_STATE_GRAD:  # d kv0 = all queries' sum, d z0 = -(its dz)
        tl.store(DH0 + i_bh.to(tl.int64) * F * Dv + f[:, None] * Dv + e[None, :], dh, mask=state_mask)
        if i_v == 0:
            tl.store(DZ0 + i_bh.to(tl.int64) * F + f, -dz, mask=f < F)


@triton.jit
def hybrid_bwd_dq_kernel(
    Q, K, V, QF, KF, M, WINDOW_FACTOR, O, DO, C, DEN, IDX, HS, ZS, LSE, DELTA, RDEN, DQ, DQF, R, RSUM,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_qfb, stride_qft, stride_qfh, stride_kfb, stride_kft, stride_kfh, stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    H, G, Tq, Tk, D, Dv, F, window, qk_scale, scale,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq (window part, with c's gradient) and dq_feat (state + band) of query block m; stores the rows' LSE, RDEN,
    DELTA and R (c's gradient) for the dk/dv kernel.

    o = num / den: d num = do / den, d den = -(do . o) / den = -DELTA / den. LSE = c + log2(den): P = exp2(s - LSE)
    = exp(s - c) / den is the window weight per unit of window_factor. A query without visible keys or state (den = 0,
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
    start, n, lo, hi = key_blocks(p_min, p_max, window, BT, True, SPLIT)
    dq = tl.zeros([BT, BD], dtype=tl.float32)
    ds_sum = tl.zeros([BT], dtype=tl.float32)
    args = (q, do, lse, delta, off + i, K, V, M, stride_kt, stride_vt, Tk, D, Dv, start)
    dq, ds_sum = softmax_bwd_dq_tiles(
        dq, ds_sum, *args, 0, lo, window, qk_scale, BT, BD, BV, True, HAS_MASK, True, True, DOT_PRECISION
    )
    dq, ds_sum = softmax_bwd_dq_tiles(
        dq, ds_sum, *args, lo, hi, window, qk_scale, BT, BD, BV, True, HAS_MASK, False, True, DOT_PRECISION
    )
    dq, ds_sum = softmax_bwd_dq_tiles(
        dq, ds_sum, *args, hi, n, window, qk_scale, BT, BD, BV, True, HAS_MASK, True, True, DOT_PRECISION
    )
    # c = max window logit: its gradient -r (the window logits' gradients sum to r) goes to the arg max key
    window_factor = tl.load(WINDOW_FACTOR + i_h)
    r = window_factor * ds_sum
    k_max = tl.load(K + idx[:, None] * stride_kt + d[None, :], mask=d[None, :] < D, other=0.0)
    dq = (window_factor * dq - r[:, None] * k_max.to(tl.float32)) * scale
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
        band = band & load_key_mask(M, jb, Tk)[None, :]
    da = tl.dot(do, tl.trans(vb), input_precision=DOT_PRECISION)  # [BT, BT]
    da = tl.where(band, rden[:, None] * (da - delta[:, None]), 0.0)
    chunk = i_bh.to(tl.int64) * NQ + i_m
    for f0 in tl.range(0, F, BK, num_stages=1):  # faster unpipelined (benchmarks/NOTES.md)
        f = f0 + tl.arange(0, BK)
        h_mask = (f[:, None] < F) & (e[None, :] < Dv)
        h = tl.load(HS + chunk * F * Dv + f[:, None] * Dv + e[None, :], mask=h_mask, other=0.0)  # [BK, BV]
        z = tl.load(ZS + chunk * F + f, mask=f < F, other=0.0)
        kf = tl.load(KF + jb[:, None] * stride_kft + f[None, :], mask=jb_in[:, None] & (f[None, :] < F), other=0.0)
        dqf = tl.dot(do, tl.trans(h), input_precision=DOT_PRECISION)  # [BT, BK]
        dqf = rden[:, None] * (dqf - delta[:, None] * z[None, :])
        dqf = tl.dot(da.to(kf.dtype), kf, dqf, input_precision=DOT_PRECISION)
        tl.store(
            DQF + i_b * stride_qfb + i_h * stride_qfh + i[:, None] * stride_qft + f[None, :],
            dqf.to(DQF.dtype.element_ty), mask=(i[:, None] < Tq) & (f[None, :] < F),
        )


@triton.jit
def hybrid_bwd_dkv_kernel(
    Q, K, V, QF, KF, M, WINDOW_FACTOR, DO, LSE, DELTA, RDEN, R, IDX, DHS, DZS, DK, DV, DKF,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_qfb, stride_qft, stride_qfh, stride_kfb, stride_kft, stride_kfh, stride_dob, stride_dot, stride_doh,
    H, G, Tq, Tk, D, Dv, F, window, qk_scale, scale, b0, m_min, NQ,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
        real_key = real_key & load_key_mask(M + i_b * Tk, j, Tk)

    start, n, lo, hi = query_blocks(n0, off, Tq, window, BT, BT, True, SPLIT)
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
        window_factor = tl.load(WINDOW_FACTOR + i_h)
        args = (k, v, j, window_factor, Qh, DOh, LSE + rows, DELTA + rows, R + rows, IDX + rows, stride_qt, stride_dot,
                Tq, off, D, Dv, start)
        dk, dv = softmax_bwd_dkv_tiles(
            dk, dv, *args, 0, lo, window, qk_scale, BT, BD, BV, True, True, True, DOT_PRECISION
        )
        dk, dv = softmax_bwd_dkv_tiles(
            dk, dv, *args, lo, hi, window, qk_scale, BT, BD, BV, True, False, True, DOT_PRECISION
        )
        dk, dv = softmax_bwd_dkv_tiles(
            dk, dv, *args, hi, n, window, qk_scale, BT, BD, BV, True, True, True, DOT_PRECISION
        )

        # band: a = phi_k . phi_q, da = (v . do - delta) / den
        q_in = (ib >= 0) & (ib < Tq)
        do = tl.load(DOh + ib[:, None] * stride_dot + e[None, :], mask=q_in[:, None] & (e[None, :] < Dv), other=0.0)
        rden = tl.load(RDEN + rows + ib, mask=q_in, other=0.0)
        delta = tl.load(DELTA + rows + ib, mask=q_in, other=0.0)
        da = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BT keys, BT queries]
        da = tl.where(band, (da - delta[None, :]) * rden[None, :], 0.0)
        a = tl.zeros([BT, BT], dtype=tl.float32)
        QFh = QF + i_b * stride_qfb + i_h * stride_qfh
        KFh = KF + i_b * stride_kfb + i_h * stride_kfh
        DKFh = DKF + i_b * stride_kfb + i_h * stride_kfh
        state = (i_b * H + i_h) * (NQ + 1) + chunk
        for f0 in tl.range(0, F, BK, num_stages=1):  # faster unpipelined, as the dq kernel's
            f = f0 + tl.arange(0, BK)
            qf = tl.load(QFh + ib[:, None] * stride_qft + f[None, :], mask=q_in[:, None] & (f[None, :] < F), other=0.0)
            kf_mask = real_key[:, None] & (f[None, :] < F)
            kf = tl.load(KFh + j[:, None] * stride_kft + f[None, :], mask=kf_mask, other=0.0)
            dh_mask = (f[:, None] < F) & (e[None, :] < Dv)
            dh = tl.load(DHS + state * F * Dv + f[:, None] * Dv + e[None, :], mask=dh_mask, other=0.0)  # [BK, BV]
            dz = tl.load(DZS + state * F + f, mask=f < F, other=0.0)
            a = tl.dot(kf, tl.trans(qf), a, input_precision=DOT_PRECISION)
            dv = tl.dot(kf, dh, dv, input_precision=DOT_PRECISION)
            dkf = tl.dot(v, tl.trans(dh), input_precision=DOT_PRECISION) - dz[None, :]  # [BT, BK]
            dkf = tl.dot(da.to(qf.dtype), qf, dkf, input_precision=DOT_PRECISION)
            tl.store(DKFh + j[:, None] * stride_kft + f[None, :], tl.where(kf_mask, dkf, 0.0).to(DKF.dtype.element_ty),
                     mask=(j[:, None] >= 0) & (j[:, None] < Tk) & (f[None, :] < F))
        a = tl.where(band, a * rden[None, :], 0.0)
        dv = tl.dot(a.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dk = tl.where(real_key[:, None], dk * scale, 0.0)
    dv = tl.where(real_key[:, None], dv, 0.0)
    tl.store(DK + k_ptrs, dk.to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + v_ptrs, dv.to(DV.dtype.element_ty), mask=v_mask)


@triton.jit
def hybrid_decode_kernel(
    Q, K, V, QF, KF, M, SM, WINDOW_FACTOR, H0, Z0, O, HT, ZT,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_qfb, stride_qfh, stride_kfb, stride_kft, stride_kfh, stride_ob, stride_oh,
    H, G, Tk, D, Dv, F, window, qk_scale,
    BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One query (at key position Tk - 1): softmax over keys [Tk - window, Tk) and, with HAS_SINKS, the sinks among
    the older keys (sink mask SM; the host zeroes their features) + phi_q . (state of the older keys); the final state
    also folds key Tk - window, which leaves the next query's window."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    d = tl.arange(0, BD)
    e = i_v * BV + tl.arange(0, BV)
    K += i_b * stride_kb + (i_h // G) * stride_kh
    V += i_b * stride_vb + (i_h // G) * stride_vh
    KF += i_b * stride_kfb + i_h * stride_kfh
    QF += i_b * stride_qfb + i_h * stride_qfh
    M += i_b * Tk
    SM += i_b * Tk

    q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + d, mask=d < D, other=0.0).to(tl.float32)
    acc = tl.zeros([BV], dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    m_i = tl.full([1], NEG_BIG, dtype=tl.float32)
    older = Tk - window  # keys [0, older) are in the state this query reads, or sinks
    for j0 in range(0 if HAS_SINKS else tl.maximum(older, 0), Tk, BN):
        j = j0 + tl.arange(0, BN)
        k = tl.load(K + j[:, None] * stride_kt + d[None, :], mask=(j[:, None] < Tk) & (d[None, :] < D), other=0.0)
        v = tl.load(V + j[:, None] * stride_vt + e[None, :], mask=(j[:, None] < Tk) & (e[None, :] < Dv), other=0.0)
        s = tl.sum(q[None, :] * k.to(tl.float32), 1) * qk_scale  # [BN]
        visible = (j >= older) & (j < Tk)
        if HAS_SINKS:
            visible = visible | load_key_mask(SM, j, Tk)
        if HAS_MASK:
            visible = visible & load_key_mask(M, j, Tk)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(prob, 0)
        acc = acc * alpha + tl.sum(prob[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    window_factor = tl.load(WINDOW_FACTOR + i_h)
    acc *= window_factor
    l_i *= window_factor

    for f0 in range(0, F, BK):
        f = f0 + tl.arange(0, BK)
        state = i_bh.to(tl.int64) * F * Dv + f[:, None] * Dv + e[None, :]
        state_mask = (f[:, None] < F) & (e[None, :] < Dv)
        if HAS_INITIAL_STATE:
            kv = tl.load(H0 + state, mask=state_mask, other=0.0)
            z = tl.load(Z0 + i_bh.to(tl.int64) * F + f, mask=f < F, other=0.0)
        else:
            kv = tl.zeros([BK, BV], dtype=tl.float32)
            z = tl.zeros([BK], dtype=tl.float32)
        for j0 in range(0, older, BN):  # only when more than window keys are passed
            j = j0 + tl.arange(0, BN)
            fold = j < older
            if HAS_MASK:
                fold = fold & load_key_mask(M, j, Tk)
            kf = tl.load(KF + j[None, :] * stride_kft + f[:, None], mask=fold[None, :] & (f[:, None] < F), other=0.0)
            v = tl.load(V + j[:, None] * stride_vt + e[None, :], mask=fold[:, None] & (e[None, :] < Dv), other=0.0)
            kv = tl.dot(kf, v, kv, input_precision=DOT_PRECISION)
            z += tl.sum(kf.to(tl.float32), 1)
        qf = tl.load(QF + f, mask=f < F, other=0.0).to(tl.float32)
        acc += tl.sum(qf[:, None] * kv, 0)
        l_i += tl.sum(qf * z, 0)
        if STORE_FINAL_STATE:
            # key `older` as a [BK] and a [BV] block, so that every mask is built from blocks (in Triton 3.9's
            # interpreter a scalar condition broadcast into a mask is int32, not boolean)
            j_k = older + tl.zeros([BK], dtype=tl.int32)
            j_v = older + tl.zeros([BV], dtype=tl.int32)
            fold = (j_k >= 0) & (f < F)
            if HAS_MASK:
                fold = fold & load_key_mask(M, j_k, Tk)
            kf = tl.load(KF + older * stride_kft + f, mask=fold, other=0.0).to(tl.float32)
            v = tl.load(V + older * stride_vt + e, mask=(j_v >= 0) & (e < Dv), other=0.0).to(tl.float32)
            tl.store(HT + state, kv + kf[:, None] * v[None, :], mask=state_mask)
            if i_v == 0:
                tl.store(ZT + i_bh.to(tl.int64) * F + f, z + kf, mask=f < F)
    o = acc / tl.maximum(l_i, TINY)
    tl.store(O + i_b * stride_ob + i_h * stride_oh + e, o.to(O.dtype.element_ty), mask=e < Dv)


# --- host side --------------------------------------------------------------------------------------------------------


def runs_reference(dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether inputs that run in `dtype` (`kernel_dtype`; None for fp64) on `device` go to the reference: fp64, and
    fp32 on a GPU, since with the default blocks Triton 3.6 fails to compile the fp32 (ieee) hybrid kernels on an H200
    ("PassManager::run failed"). The interpreter (CPU) runs them, for the tests."""
    return dtype is None or (dtype == torch.float32 and device.type == "cuda")


def _hybrid_layout(q, k, window):
    """-> (BT, NQ, b0, m_min): query blocks of BT; key chunk m starts at b0 + m BT, m_min is the first holding keys."""
    Tq, Tk = q.shape[1], k.shape[1]
    BT = block_size(Tq, BLOCK_T)
    b0 = Tk - Tq - window + 1
    return BT, cdiv(Tq, BT), b0, -cdiv(max(b0, 0), BT)


def _hybrid_state(kf, v, key_mask, kv0, z0, window, BT, NQ, b0, m_min, store_states, output_final):
    """hybrid_state_fwd_kernel: (HS [B, H, NQ, F, Dv], ZS [B, H, NQ, F]) if store_states; (kv, z) final if asked.
    Without features (F = 0: no linear part) the states are empty and nothing runs."""
    B, Tk, H, F = kf.shape
    Hkv, Dv = v.shape[2], v.shape[-1]
    BK, BV = block_size(F, BLOCK_K), block_size(Dv, BLOCK_V)
    hs = kf.new_empty(B, H, NQ if store_states else 0, F, Dv)
    zs = kf.new_empty(B, H, NQ if store_states else 0, F, dtype=torch.float32)
    if not F:
        empty = (kf.new_empty(B, H, 0, Dv, dtype=torch.float32), kf.new_empty(B, H, 0, dtype=torch.float32))
        return (hs, zs), (empty if output_final else None)
    chunks = NQ - m_min
    programs = cdiv(F, BK) * cdiv(Dv, BV) * B * H
    segments, segment_chunks = split_range(chunks, key_splits(programs, chunks, kf.device))
    final = (
        kf.new_empty(segments, B, H, F, Dv, dtype=torch.float32),
        kf.new_empty(segments, B, H, F, dtype=torch.float32),
    )
    mask, has_mask = key_mask_arg(key_mask, kf)
    hybrid_state_fwd_kernel[(cdiv(F, BK), cdiv(Dv, BV), segments * B * H)](
        kf, v, mask, kv0 if kv0 is not None else kf, z0 if z0 is not None else kf, hs, zs, *final,
        *bth_strides(kf, v), H, H // Hkv, Tk, F, Dv, b0, m_min, NQ, max(Tk - window + 1, 0), segment_chunks,
        BT=BT, BK=BK, BV=BV, HAS_MASK=has_mask, HAS_INITIAL_STATE=kv0 is not None, STORE_STATES=store_states,
        STORE_FINAL_STATE=output_final, SEGMENTS=segments > 1, DOT_PRECISION=dot_precision(kf), num_warps=4,
        num_stages=NUM_STAGES,
    )
    if segments > 1:  # add to each chunk's state the sums of the segments before its own
        before = [x.cumsum(0) - x for x in final]
        if store_states:
            segment_of_chunk = torch.arange(NQ, device=kf.device).sub(m_min).div(segment_chunks, rounding_mode="floor")
            hs.copy_(hs.float() + before[0][segment_of_chunk].permute(1, 2, 0, 3, 4))
            zs.add_(before[1][segment_of_chunk].permute(1, 2, 0, 3))
        final = tuple(b[-1] + x[-1] for b, x in zip(before, final))
    else:
        final = tuple(x[0] for x in final)
    return (hs, zs), (final if output_final else None)


def _hybrid_fwd(
    q, k, v, qf, kf, window_factor, kv0, z0, window, key_mask, scale, output_final_state, keep_fp32, sinks=None
):
    """-> o, o in fp32 (o itself if fp32; None unless keep_fp32), c, den, idx [B, H, Tq], final state or None.
    sinks: (positions [B, S] int32, -1 for none; keys [B, S, Hkv, D]; values [B, S, Hkv, Dv]; the early queries'
    count S_EARLY, the first late query) or None, forward only (see hybrid_fwd_kernel); kf must be zero at the sinks."""
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv, F = k.shape[1], k.shape[2], v.shape[-1], qf.shape[-1]
    BT, NQ, b0, m_min = _hybrid_layout(q, k, window)
    (hs, zs), final = _hybrid_state(kf, v, key_mask, kv0, z0, window, BT, NQ, b0, m_min, True, output_final_state)
    o = torch.empty(B, Tq, H, Dv, dtype=v.dtype, device=q.device)
    o32 = o if o.dtype == torch.float32 else (torch.empty_like(o, dtype=torch.float32) if keep_fp32 else None)
    c, den = (torch.empty(B, H, Tq, dtype=torch.float32, device=q.device) for _ in range(2))
    idx = torch.empty(B, H, Tq, dtype=torch.int32, device=q.device)
    mask, has_mask = key_mask_arg(key_mask, q)
    BD, BV = block_size(D), block_size(Dv)
    sink_pos, early, first_late = sinks if sinks is not None else (mask, 0, Tq)
    S = sink_pos.shape[1] if sinks is not None else 0
    hybrid_fwd_kernel[(NQ, B * H)](
        q, k, v, qf, kf, mask, window_factor, hs, zs, o, o if o32 is None else o32, c, den, idx, sink_pos,
        *bth_strides(q, k, v, qf, kf, o), H, H // Hkv, Tq, Tk, D, Dv, F, S, early, first_late, window, scale * LOG2E,
        BT=BT, BD=BD, BV=BV, BK=block_size(F, BLOCK_K), BS=block_size(S, BLOCK_SINKS), HAS_MASK=has_mask,
        HAS_SINKS=sinks is not None, HAS_FEATURES=F > 0, SPLIT=split_loops(window),
        STORE_O32=o32 is not None and o32 is not o,
        DOT_PRECISION=dot_precision(q), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return o, o32, c, den, idx, final


def _hybrid_bwd(q, k, v, qf, kf, window_factor, kv0, z0, o32, c, den, idx, do, window, key_mask, scale, init_grad):
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv, F = k.shape[1], k.shape[2], v.shape[-1], qf.shape[-1]
    BT, NQ, b0, m_min = _hybrid_layout(q, k, window)
    BD, BV, BK = block_size(D), block_size(Dv), block_size(F, BLOCK_K)
    (hs, zs), _ = _hybrid_state(kf, v, key_mask, kv0, z0, window, BT, NQ, b0, m_min, True, False)
    lse, delta, rden, r, ds_sum = (torch.empty_like(den) for _ in range(5))  # per query row, from the dq kernel
    dq, dk, dv, dqf, dkf = (torch.empty_like(x) for x in (q, k, v, qf, kf))
    mask, has_mask = key_mask_arg(key_mask, q)
    common = dict(BT=BT, BD=BD, BV=BV, BK=BK, HAS_MASK=has_mask, SPLIT=split_loops(window),
                  DOT_PRECISION=dot_precision(q), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    sizes = (H, H // Hkv, Tq, Tk, D, Dv, F, window, scale * LOG2E, scale)
    hybrid_bwd_dq_kernel[(NQ, B * H)](
        q, k, v, qf, kf, mask, window_factor, o32, do, c, den, idx, hs, zs, lse, delta, rden, dq, dqf, r, ds_sum,
        *bth_strides(q, k, v, qf, kf, o32, do), *sizes, **common,
    )

    dhs = qf.new_empty(B, H, NQ + 1, F, Dv)
    dzs = qf.new_empty(B, H, NQ + 1, F, dtype=torch.float32)
    d_init = (qf.new_empty(B, H, F, Dv, dtype=torch.float32), qf.new_empty(B, H, F, dtype=torch.float32))
    BVs = block_size(Dv, BLOCK_V)
    if F:
        hybrid_state_bwd_kernel[(cdiv(F, BK), cdiv(Dv, BVs), B * H)](
            qf, do, rden, delta, dhs, dzs, *d_init, *bth_strides(qf, do), H, Tq, F, Dv, NQ,
            BT=BT, BK=BK, BV=BVs, STORE_INITIAL_STATE_GRAD=init_grad, DOT_PRECISION=dot_precision(q), num_warps=4,
            num_stages=NUM_STAGES,
        )

    n_chunks = cdiv(Tk - b0, BT) - m_min  # key chunks m_min .. covering [0, Tk)
    hybrid_bwd_dkv_kernel[(n_chunks, B * Hkv)](
        q, k, v, qf, kf, mask, window_factor, do, lse, delta, rden, r, idx, dhs, dzs, dk, dv, dkf,
        *bth_strides(q, k, v, qf, kf, do), *sizes, b0, m_min, NQ, **common,
    )
    dwindow_factor = ds_sum.sum((0, 2)).to(window_factor.dtype)  # sum over the window of exp(s - c) d a
    return dq, dk, dv, dqf, dkf, dwindow_factor, (d_init if init_grad else (None, None))


class HybridAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_feat, k_feat, window_factor, kv0, z0, window, key_mask, scale, output_final_state):
        o, o32, c, den, idx, final = _hybrid_fwd(
            q, k, v, q_feat, k_feat, window_factor, kv0, z0, window, key_mask, scale, output_final_state,
            keep_fp32=any(ctx.needs_input_grad),
        )
        ctx.save_for_backward(q, k, v, q_feat, k_feat, window_factor, kv0, z0, key_mask, o32, c, den, idx)
        ctx.window, ctx.scale = window, scale
        ctx.set_materialize_grads(False)
        return (o, *final) if output_final_state else o

    @staticmethod
    def backward(ctx, do, *d_final):
        if any(g is not None for g in d_final):
            raise NotImplementedError("hybrid_attention (Triton): no gradient through the returned final_state")
        q, k, v, q_feat, k_feat, window_factor, kv0, z0, key_mask, o32, c, den, idx = ctx.saved_tensors
        if do is None:
            return (None,) * 12
        init_grad = kv0 is not None and (ctx.needs_input_grad[6] or ctx.needs_input_grad[7])
        dq, dk, dv, dqf, dkf, dwindow_factor, (d_kv0, d_z0) = _hybrid_bwd(
            q, k, v, q_feat, k_feat, window_factor, kv0, z0, o32, c, den, idx, unit_last_dim(do), ctx.window, key_mask,
            ctx.scale, init_grad,
        )
        return dq, dk, dv, dqf, dkf, dwindow_factor, d_kv0, d_z0, None, None, None, None


def _check_hybrid(q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state):
    """The reference's checks (same errors); -> the initial state in fp32, or (None, None)."""
    check_attention_inputs(q, k, v, key_mask)
    check_window(window)
    batch, q_len, heads, _ = q.shape
    num_features = check_shape("q_feat", q_feat, "batch, time, heads, features", (batch, q_len, heads, None))[-1]
    check_shape("k_feat", k_feat, "batch, time, heads, features", (batch, k.shape[1], heads, num_features))
    check_shape("window_factor", window_factor, "heads", (heads,))
    if initial_state is None:
        return None, None
    return prepare_state(initial_state, batch, heads, num_features, v.shape[-1], torch.float32, q.device)


def _without_sink_features(k_feat, sink_mask):
    """k_feat with the sinks' features zeroed: the kernels then keep sinks out of the linear part and the state (the
    key mask keeps padded keys out)."""
    check_shape("sink_mask", sink_mask, "batch, time", k_feat.shape[:2])
    return k_feat * (sink_mask == 0)[:, :, None, None] if k_feat.shape[-1] else k_feat


def _sink_positions(key_mask, lists):
    """The real keys of each list in `lists`, list after list: (positions [B, S], -1 for none; the length of each
    list). A list is (mask [B, Tk], bound on a row's count or None: read on the host) or (None, key positions
    [B, S'], entries outside [0, Tk) for none)."""
    found = []
    for mask, listed in lists:
        if mask is None:
            found.append(listed.long())
            continue
        real = mask.bool() & key_mask.bool() if key_mask is not None else mask.bool()
        position, taken = first_positions(real, int(real.sum(1).max()) if listed is None else listed)
        found.append(torch.where(taken, position, -1))
    position = torch.cat(found, 1) if len(found) > 1 else found[0]
    if key_mask is not None and any(mask is None for mask, _ in lists):  # padded keys listed by position are none
        position = torch.where(key_mask.bool().gather(1, position.clamp(0, key_mask.shape[1] - 1)), position, -1)
    return position.contiguous(), [p.shape[1] for p in found]


def _hybrid_attention(
    q, k, v, q_feat, k_feat, window_factor, window, key_mask=None, initial_state=None, output_final_state=False,
    scale=None, sink_mask=None, max_sinks=None, late=None, sink_index=None,
):
    """hybrid_attention, late sinks given as `late` = (late_sink_mask, late_queries, max_late_sinks, late_sink_index):
    one forward kernel computes them where `one_kernel_for_late_sinks`, two calls otherwise. The lists come by
    position (`sink_index`, `late_sink_index`) only where the forward kernel runs (see `hybrid_attention`)."""
    kv0, z0 = _check_hybrid(q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state)
    if late is not None:
        if sink_mask is not None:
            check_shape("sink_mask", sink_mask, "batch, time", k.shape[:2])
        late_sink_mask, late_queries, max_late_sinks, late_sink_index = late
        check_late_arguments(k, late_sink_mask, late_queries)
        if not one_kernel_for_late_sinks(q, k, v, q_feat, k_feat, window_factor, initial_state):
            args = (q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state, output_final_state, scale)
            late_kwargs = dict(late_sink_mask=late_sink_mask, late_queries=late_queries, max_late_sinks=max_late_sinks)
            return _hybrid_attention_two_calls(*args, sink_mask, max_sinks, **late_kwargs)
    if sink_mask is not None and needs_grad(q, k, v, q_feat, k_feat, window_factor, *(initial_state or ())):
        return hybrid_attention_chunked(
            q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state, output_final_state, scale,
            sink_mask, max_sinks,
        )
    dtype = kernel_dtype(q, k, v, q_feat, k_feat)
    if runs_reference(dtype, q.device):
        return hybrid_attention_reference(
            q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state, output_final_state, scale,
            sink_mask,
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    q, k, v, q_feat, k_feat = (kernel_layout(x.to(dtype)) for x in (q, k, v, q_feat, k_feat))
    window_factor = window_factor.float()
    kv0, z0 = (None, None) if kv0 is None else (kv0.contiguous(), z0.contiguous())
    has_early = sink_mask is not None or sink_index is not None
    if has_early or late is not None:
        if sink_mask is not None and late is None:  # with late sinks or by position there are no features
            k_feat = _without_sink_features(k_feat, sink_mask)
        lists, first_late = [], q.shape[1]
        if has_early:
            lists.append((sink_mask, max_sinks) if sink_index is None else (None, sink_index))
        if late is not None:
            lists.append((late_sink_mask, max_late_sinks) if late_sink_index is None else (None, late_sink_index))
            first_late = max(q.shape[1] - late_queries, 0)
        position, lengths = _sink_positions(key_mask, lists)
        sinks = (position, lengths[0] if has_early else 0, first_late)
        o, _, _, _, _, final = _hybrid_fwd(
            q, k, v, q_feat, k_feat, window_factor, kv0, z0, window, key_mask, scale, output_final_state, False, sinks
        )
        return o.to(out_dtype), (final if output_final_state else None)
    out = HybridAttentionFunction.apply(
        q, k, v, q_feat, k_feat, window_factor, kv0, z0, window, key_mask, scale, output_final_state
    )
    if output_final_state:
        return out[0].to(out_dtype), (out[1], out[2])
    return out.to(out_dtype), None


_hybrid_attention_two_calls = with_late_sinks(_hybrid_attention)


def one_kernel_for_late_sinks(q, k, v, q_feat, k_feat, window_factor, initial_state) -> bool:
    """Whether late sinks run in one forward kernel (a prefill without a linear term: F = 0, no gradients, a dtype
    the kernels take), rather than as two calls: with features, the linear part and the state of the late queries
    leave out other keys than the early ones'."""
    tensors = (q, k, v, q_feat, k_feat, window_factor, *(initial_state or ()))
    dtype = kernel_dtype(q, k, v, q_feat, k_feat)
    return not q_feat.shape[-1] and not needs_grad(*tensors) and not runs_reference(dtype, q.device)


@functools.partial(with_sink_index, takes_index=one_kernel_for_late_sinks)
def hybrid_attention(
    q, k, v, q_feat, k_feat, window_factor, window, key_mask=None, initial_state=None, output_final_state=False,
    scale=None, sink_mask=None, max_sinks=None, late_sink_mask=None, late_queries=0, max_late_sinks=None,
    sink_index=None, late_sink_index=None,
):
    """Triton twin of the reference `hybrid_attention` (same arguments, result, errors). The backward kernels have
    no sinks: with a `sink_mask` and gradients to compute, the blockwise PyTorch form runs instead. Late sinks run in
    the forward kernel beside the others where `one_kernel_for_late_sinks`, else as two calls; the forward kernel
    reads sinks given by position where they are (no gathering, no sorting), which it does there only."""
    late = None
    if late_sink_mask is not None or late_sink_index is not None:
        late = (late_sink_mask, late_queries, max_late_sinks, late_sink_index)
    return _hybrid_attention(
        q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state, output_final_state, scale, sink_mask,
        max_sinks, late, sink_index,
    )


def hybrid_attention_recurrent(
    q, k, v, q_feat, k_feat, window_factor, window, key_mask=None, initial_state=None, output_final_state=False,
    scale=None, sink_mask=None,
):
    """Triton twin of the reference `hybrid_attention_recurrent`: one fused kernel for the decode
    step (Tq = 1, no gradients); the parallel op otherwise (same math)."""
    kv0, z0 = _check_hybrid(q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state)
    dtype = kernel_dtype(q, k, v, q_feat, k_feat)
    tensors = (k, v, q_feat, k_feat, window_factor, *(initial_state or ()))
    if runs_reference(dtype, q.device) or not use_decode_kernel(q, *tensors):
        return hybrid_attention(
            q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state, output_final_state, scale,
            sink_mask,
        )
    if sink_mask is not None:
        k_feat = _without_sink_features(k_feat, sink_mask)
    B, _, H, D = q.shape
    Tk, Hkv, Dv, F = k.shape[1], k.shape[2], v.shape[-1], q_feat.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    q, k, v, q_feat, k_feat = (kernel_layout(x.to(dtype)) for x in (q, k, v, q_feat, k_feat))
    o = torch.empty(B, 1, H, Dv, dtype=v.dtype, device=q.device)
    final = (q.new_empty(B, H, F, Dv, dtype=torch.float32), q.new_empty(B, H, F, dtype=torch.float32))
    mask, has_mask = key_mask_arg(key_mask, q)
    sinks, has_sinks = key_mask_arg(sink_mask, q)
    BV = block_size(Dv, BLOCK_V)
    hybrid_decode_kernel[(cdiv(Dv, BV), B * H)](
        q, k, v, q_feat, k_feat, mask, sinks, window_factor.float(), kv0 if kv0 is not None else q,
        z0 if z0 is not None else q, o, *final,
        q.stride(0), q.stride(2), *bth_strides(k, v), q_feat.stride(0), q_feat.stride(2), *bth_strides(k_feat),
        o.stride(0), o.stride(2), H, H // Hkv, Tk, D, Dv, F, window, scale * LOG2E,
        BN=BLOCK_DECODE, BD=block_size(D), BV=BV, BK=block_size(F, BLOCK_K), HAS_MASK=has_mask,
        HAS_SINKS=has_sinks, HAS_INITIAL_STATE=kv0 is not None, STORE_FINAL_STATE=output_final_state,
        DOT_PRECISION=dot_precision(q), num_warps=4,
    )
    return o.to(out_dtype), (final if output_final_state else None)
