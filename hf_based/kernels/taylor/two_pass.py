"""Triton BASED Taylor linear attention in two passes: segment states, then every chunk in parallel.

Same semantics as the chunked op of triton.py (outputs in v.dtype, den kept in fp32 for the backward, states fp32 in
the reference's layout), another way to get there. triton.py's scan kernels hold a whole [F, BV] state per program
while they walk a segment's chunks, and spill registers (the second-order block alone is 256 x BV fp32 at d = 16).
Here no program holds more than a 64-row slice of a state:

1. taylor_segment_states_kernel, grid (1 + d / RA, NV, B*H): program i_f walks the whole sequence for its rows of
   the state only (i_f = 0: the zeroth and first-order rows; i_f > 0: the second-order rows (a, b) with a in
   [(i_f - 1) RA, i_f RA)), a [RA*BD, BV] fp32 slice, and stores the slice at the start of every segment of SEG
   tokens into hs [B*H, NS, FP, Dv] (zs [B*H, NS, FP] for the normaliser). hs is kept in bf16 for 16-bit inputs
   (the dots read the states as bf16 anyway) and in fp32 for fp32 inputs.
2. taylor_output_kernel, grid (NV, T / BT, B*H): one chunk of queries reads its segment's starting state, a feature
   block at a time (phi(q) @ hs, one [BT, RA*BD] @ [RA*BD, BV] product per block), and adds the segment's keys up to
   itself in the quadratic form (1 + s + s^2/2, causal). No program depends on another.

hs uses a padded layout: row 0 the constant feature, rows 1..BD the first order, row 1 + BD + a*BD + b the feature
x2_a x2_b (BD = d rounded up to a power of 2 >= 16; padded features are zero). Initial and final states are read and
written in the reference's layout (F = 1 + d + d^2).

Backward (g_t = do_t / (den_t + eps), gd_t = -(do_t . o_t) / (den_t + eps), as in triton.py):
- the segment states of the keys again (pass 1), and those of the queries in reverse time, sum over the later
  segments of phi(q_t) g_t^T and phi(q_t) gd_t, starting from the final state's gradient (the same kernel, REVERSE);
  that reverse pass's last state is the initial state's gradient;
- taylor_bwd_dq_kernel per query chunk: the gradient of phi(q_t).(kv g_t + z gd_t) at its segment's start state,
  plus the segment's earlier keys; taylor_bwd_dkv_kernel per key chunk: dk and dv from the later segments' query
  moments, plus the segment's later queries.
The second-order readouts take the state's d x d block as symmetric, true of every state that keys or queries build;
states from outside are symmetrised first (`shared._symmetric`).
"""

import torch
import triton
import triton.language as tl

from hf_based.kernels.feature_maps import taylor_num_features
from hf_based.kernels.taylor.shared import (
    _dot,
    _head_inputs,
    _head_output_grads,
    _load_values,
    _state_args,
    _symmetric,
    _token_weights,
    normaliser_grads,
)
from hf_based.kernels.triton_utils import block_size, cdiv, dot_precision

# Block sizes (powers of 2). Not yet timed on a GPU; chosen so that the kernels do not spill registers when compiled
# for sm_90 (Triton 3.6: none; 3.9: 8 bytes a thread in one variant; benchmarks/kernel_registers.py).
BLOCK_T = 64  # chunk length
SEGMENT = 256  # tokens between stored states: a multiple of BLOCK_T
STATE_ROWS = 64  # second-order state rows per program: RA = STATE_ROWS / BD values of a
BLOCK_V_STATES = 32  # value columns per program of pass 1
BLOCK_V = 64  # value columns per program of the output and gradient kernels
NUM_WARPS = 4
NUM_STAGES = 2


# --- tiles ----------------------------------------------------------------------------------------------------------


@triton.jit
def _columns(x, o_t, m_t, c0, D, s_t, s_d, BC: tl.constexpr):
    """x[o_t, c0 : c0 + BC] in fp32 [BT, BC], zero outside [0, T) x [0, D)."""
    o_c = c0 + tl.arange(0, BC)
    b_x = tl.load(x + o_t[:, None] * s_t + o_c[None, :] * s_d, mask=m_t[:, None] & (o_c[None, :] < D), other=0.0)
    return b_x.to(tl.float32)


@triton.jit
def _second_order(b_xa, b_x2, BT: tl.constexpr, RA: tl.constexpr, BD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Second-order features of rows a0 .. a0 + RA: [BT, RA*BD], column r*BD + b = x2_(a0+r) x2_b, in the dots'
    operand dtype."""
    b_f = tl.reshape(b_xa[:, :, None] * b_x2[:, None, :], [BT, RA * BD])
    if DOT_PRECISION != "ieee":
        b_f = b_f.to(tl.bfloat16)
    return b_f


@triton.jit
def _fold_second_order(b_u, b_xa, BT: tl.constexpr, RA: tl.constexpr, BD: tl.constexpr):
    """sum_r U[t, r*BD + b] x2_(a0+r): a block's share of d/dx2_b of sum_(a,b) U_ab x2_a x2_b, halved (U symmetric)."""
    return tl.sum(tl.reshape(b_u, [BT, RA, BD]) * b_xa[:, :, None], 1)


# --- pass 1: segment states -----------------------------------------------------------------------------------------


@triton.jit
def taylor_segment_states_kernel(
    x, y, w, c, kv0, z0, hs, zs, kvT, zT,
    s_xb, s_xt, s_xh, s_xd, s_yb, s_yt, s_yh, s_yv, s_wb, s_wt, s_wh,
    T, H, D, DV, SEG, scale1, scale2,
    BT: tl.constexpr, BD: tl.constexpr, RA: tl.constexpr, BV: tl.constexpr,
    WEIGHTED: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Rows i_f of sum_t phi(x_t) (w_t y_t)^T and sum_t phi(x_t) c_t, stored at the start of every segment (in scan
    order: REVERSE stores the sum over the later segments)."""
    i_f, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NS = tl.cdiv(T, SEG)
    F = 1 + D + D * D
    FP = 1 + BD + BD * BD
    o_d = tl.arange(0, BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    x += i_b * s_xb + i_h * s_xh
    y += i_b * s_yb + i_h * s_yh
    w += i_b * s_wb + i_h * s_wh
    c += i_b * s_wb + i_h * s_wh
    kv0 += i_bh * F * DV
    z0 += i_bh * F
    kvT += i_bh * F * DV
    zT += i_bh * F
    if i_f == 0:
        m_d = o_d < D
        if HAS_INITIAL_STATE:
            b_h0 = tl.load(kv0 + o_v, mask=m_v, other=0.0)
            b_h1 = tl.load(kv0 + (1 + o_d[:, None]) * DV + o_v[None, :], mask=m_d[:, None] & m_v[None, :], other=0.0)
            b_z0 = tl.load(z0)
            b_z1 = tl.load(z0 + 1 + o_d, mask=m_d, other=0.0)
        else:
            b_h0 = tl.zeros([BV], dtype=tl.float32)
            b_h1 = tl.zeros([BD, BV], dtype=tl.float32)
            b_z0 = tl.zeros([], dtype=tl.float32)
            b_z1 = tl.zeros([BD], dtype=tl.float32)
        for i_n in range(NS):
            i_s = NS - 1 - i_n if REVERSE else i_n
            slot = (i_bh * NS + i_s).to(tl.int64)  # hs can exceed 2^31 elements
            tl.store(hs + slot * FP * DV + o_v, b_h0.to(hs.dtype.element_ty), mask=m_v)
            tl.store(hs + slot * FP * DV + (1 + o_d[:, None]) * DV + o_v[None, :], b_h1.to(hs.dtype.element_ty),
                     mask=m_v[None, :])
            if i_v == 0:
                tl.store(zs + slot * FP, b_z0)
                tl.store(zs + slot * FP + 1 + o_d, b_z1)
            for t0 in range(i_s * SEG, tl.minimum(i_s * SEG + SEG, T), BT):
                o_t = t0 + tl.arange(0, BT)
                m_t = o_t < T
                b_x1 = _columns(x, o_t, m_t, 0, D, s_xt, s_xd, BD) * scale1
                b_y, b_c = _load_values(y, w, c, o_t, m_t, o_v, DV, s_yt, s_yv, s_wt, WEIGHTED)
                b_h0 += tl.sum(b_y, 0)
                b_h1 = _dot(tl.trans(b_x1), b_y, b_h1, DOT_PRECISION)
                b_z0 += tl.sum(b_c, 0)
                b_z1 += tl.sum(b_x1 * b_c[:, None], 0)
        if STORE_FINAL_STATE:
            tl.store(kvT + o_v, b_h0, mask=m_v)
            tl.store(kvT + (1 + o_d[:, None]) * DV + o_v[None, :], b_h1, mask=m_d[:, None] & m_v[None, :])
            if i_v == 0:
                tl.store(zT, b_z0)
                tl.store(zT + 1 + o_d, b_z1, mask=m_d)
    else:
        a0 = (i_f - 1) * RA
        o_r = tl.arange(0, RA * BD)
        row_a, row_b = a0 + o_r // BD, o_r % BD
        m_r = (row_a < D) & (row_b < D)
        ref_rows = 1 + D + row_a * D + row_b  # the reference layout's rows, for the initial and final states
        pad_rows = 1 + BD + a0 * BD + o_r
        if HAS_INITIAL_STATE:
            b_h2 = tl.load(kv0 + ref_rows[:, None] * DV + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.0)
            b_z2 = tl.load(z0 + ref_rows, mask=m_r, other=0.0)
        else:
            b_h2 = tl.zeros([RA * BD, BV], dtype=tl.float32)
            b_z2 = tl.zeros([RA * BD], dtype=tl.float32)
        for i_n in range(NS):
            i_s = NS - 1 - i_n if REVERSE else i_n
            slot = (i_bh * NS + i_s).to(tl.int64)  # hs can exceed 2^31 elements
            tl.store(hs + slot * FP * DV + pad_rows[:, None] * DV + o_v[None, :], b_h2.to(hs.dtype.element_ty),
                     mask=m_v[None, :])
            if i_v == 0:
                tl.store(zs + slot * FP + pad_rows, b_z2)
            for t0 in range(i_s * SEG, tl.minimum(i_s * SEG + SEG, T), BT):
                o_t = t0 + tl.arange(0, BT)
                m_t = o_t < T
                b_x2 = _columns(x, o_t, m_t, 0, D, s_xt, s_xd, BD) * scale2
                b_xa = _columns(x, o_t, m_t, a0, D, s_xt, s_xd, RA) * scale2
                b_f = _second_order(b_xa, b_x2, BT, RA, BD, DOT_PRECISION)
                b_y, b_c = _load_values(y, w, c, o_t, m_t, o_v, DV, s_yt, s_yv, s_wt, WEIGHTED)
                b_h2 = _dot(tl.trans(b_f), b_y, b_h2, DOT_PRECISION)
                b_z2 += tl.sum(b_f.to(tl.float32) * b_c[:, None], 0)
        if STORE_FINAL_STATE:
            tl.store(kvT + ref_rows[:, None] * DV + o_v[None, :], b_h2, mask=m_r[:, None] & m_v[None, :])
            if i_v == 0:
                tl.store(zT + ref_rows, b_z2, mask=m_r)


# --- pass 2: outputs ------------------------------------------------------------------------------------------------


@triton.jit
def taylor_output_kernel(
    q, k, v, m, hs, zs, o, den,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vv, s_mb, s_mt, s_mh,
    T, H, D, DV, SEG, eps, scale1, scale2,
    BT: tl.constexpr, BD: tl.constexpr, RA: tl.constexpr, BV: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """o (and den) of one query chunk: its segment's starting state, then the segment's keys up to the chunk."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NS = tl.cdiv(T, SEG)
    FP = 1 + BD + BD * BD
    t0 = i_t * BT
    i_s = t0 // SEG
    o_i = tl.arange(0, BT)
    o_t = t0 + o_i
    m_t = o_t < T
    o_d = tl.arange(0, BD)
    o_r = tl.arange(0, RA * BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    q, k, v, m = _head_inputs(q, k, v, m, i_b, i_h, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_mb, s_mh)
    slot = (i_bh * NS + i_s).to(tl.int64)  # hs can exceed 2^31 elements
    p_h = hs + slot * FP * DV
    p_z = zs + slot * FP

    b_q = _columns(q, o_t, m_t, 0, D, s_qt, s_qd, BD)
    b_q1, b_q2 = b_q * scale1, b_q * scale2
    # the earlier segments, order by order: [BT, BV] numerator, [BT] denominator
    b_h1 = tl.load(p_h + (1 + o_d[:, None]) * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
    b_num = _dot(b_q1, b_h1, None, DOT_PRECISION) + tl.load(p_h + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    b_den = tl.load(p_z) + tl.sum(b_q1 * tl.load(p_z + 1 + o_d)[None, :], 1)
    for a0 in range(0, D, RA):
        b_f = _second_order(_columns(q, o_t, m_t, a0, D, s_qt, s_qd, RA) * scale2, b_q2, BT, RA, BD, DOT_PRECISION)
        rows = 1 + BD + a0 * BD + o_r
        b_h2 = tl.load(p_h + rows[:, None] * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_num = _dot(b_f, b_h2, b_num, DOT_PRECISION)
        b_den += tl.sum(b_f.to(tl.float32) * tl.load(p_z + rows)[None, :], 1)
    # this segment's keys up to the chunk
    for j0 in range(i_s * SEG, t0 + BT, BT):
        o_j = j0 + o_i
        m_j = o_j < T
        b_k1 = _columns(k, o_j, m_j, 0, D, s_kt, s_kd, BD) * scale1
        b_y, b_c = _load_values(v, m, m, o_j, m_j, o_v, DV, s_vt, s_vv, s_mt, HAS_MASK)
        b_s = _dot(b_q1, tl.trans(b_k1), None, DOT_PRECISION)
        b_p = tl.where(o_t[:, None] >= o_j[None, :], 1 + b_s + 0.5 * b_s * b_s, 0.0)
        b_num = _dot(b_p, b_y, b_num, DOT_PRECISION)
        b_den += tl.sum(b_p * b_c[None, :], 1)
    b_o = b_num / (b_den + eps)[:, None]
    tl.store(o + ((i_b * T + o_t[:, None]) * H + i_h) * DV + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(den + (i_b * T + o_t) * H + i_h, b_den, mask=m_t)


# --- backward -------------------------------------------------------------------------------------------------------


@triton.jit
def taylor_bwd_dq_kernel(
    q, k, v, m, do, rd, gd, hs, zs, dq,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vv, s_mb, s_mt, s_mh,
    s_db, s_dt, s_dh, s_dv,
    B, T, H, D, DV, SEG, scale1, scale2,
    BT: tl.constexpr, BD: tl.constexpr, RA: tl.constexpr, BV: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq of one query chunk (value block i_v's share): the segment's starting state read out as the gradient of
    phi(q_t).(kv g_t + z gd_t), plus the segment's earlier keys."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NS = tl.cdiv(T, SEG)
    FP = 1 + BD + BD * BD
    t0 = i_t * BT
    i_s = t0 // SEG
    o_i = tl.arange(0, BT)
    o_t = t0 + o_i
    m_t = o_t < T
    o_d = tl.arange(0, BD)
    o_r = tl.arange(0, RA * BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    q, k, v, m = _head_inputs(q, k, v, m, i_b, i_h, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_mb, s_mh)
    do, rd, gd = _head_output_grads(do, rd, gd, i_b, i_h, s_db, s_dh, T, H)
    dq += ((i_v * B + i_b) * T * H + i_h) * D
    slot = (i_bh * NS + i_s).to(tl.int64)  # hs can exceed 2^31 elements
    p_h = hs + slot * FP * DV
    p_z = zs + slot * FP
    # the normaliser's share (gd) goes to value block 0 only
    c_share = (i_v == 0).to(tl.float32)

    b_q1 = _columns(q, o_t, m_t, 0, D, s_qt, s_qd, BD) * scale1
    # [BT, BV] dL/dnum, [BT] dL/dden
    b_g, b_gd = _load_values(do, rd, gd, o_t, m_t, o_v, DV, s_dt, s_dv, H, True)
    b_gd *= c_share
    # [BT, BD] dL/dq in units of scale1 (first order and the segment's keys) and of 2 scale2 (second order)
    b_h1 = tl.load(p_h + (1 + o_d[:, None]) * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
    b_dq1 = _dot(b_g, tl.trans(b_h1), None, DOT_PRECISION) + b_gd[:, None] * tl.load(p_z + 1 + o_d)[None, :]
    b_dq2 = tl.zeros([BT, BD], dtype=tl.float32)
    for a0 in range(0, D, RA):
        b_qa = _columns(q, o_t, m_t, a0, D, s_qt, s_qd, RA) * scale2
        rows = 1 + BD + a0 * BD + o_r
        b_h2 = tl.load(p_h + rows[:, None] * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_u = _dot(b_g, tl.trans(b_h2), None, DOT_PRECISION) + b_gd[:, None] * tl.load(p_z + rows)[None, :]
        b_dq2 += _fold_second_order(b_u, b_qa, BT, RA, BD)
    for j0 in range(i_s * SEG, t0 + BT, BT):
        o_j = j0 + o_i
        m_j = o_j < T
        b_k1 = _columns(k, o_j, m_j, 0, D, s_kt, s_kd, BD) * scale1
        b_y, b_c = _load_values(v, m, m, o_j, m_j, o_v, DV, s_vt, s_vv, s_mt, HAS_MASK)
        b_s = _dot(b_q1, tl.trans(b_k1), None, DOT_PRECISION)
        # [BT, BT] dL/dK_tj (1 + s_tj)
        b_ds = _dot(b_g, tl.trans(b_y), None, DOT_PRECISION) + b_gd[:, None] * b_c[None, :]
        b_ds = tl.where(o_t[:, None] >= o_j[None, :], b_ds * (1 + b_s), 0.0)
        b_dq1 = _dot(b_ds, b_k1, b_dq1, DOT_PRECISION)
    b_dq = b_dq1 * scale1 + b_dq2 * (2 * scale2)
    tl.store(dq + o_t[:, None] * H * D + o_d[None, :], b_dq.to(dq.dtype.element_ty),
             mask=m_t[:, None] & (o_d < D)[None, :])


@triton.jit
def taylor_bwd_dkv_kernel(
    q, k, v, m, do, rd, gd, hs, zs, dk, dv,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vv, s_mb, s_mt, s_mh,
    s_db, s_dt, s_dh, s_dv,
    B, T, H, D, DV, SEG, scale1, scale2,
    BT: tl.constexpr, BD: tl.constexpr, RA: tl.constexpr, BV: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dk (value block i_v's share) and dv of one key chunk: the later segments' query moments hs, zs (the reverse
    pass), plus the segment's later queries."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NS = tl.cdiv(T, SEG)
    FP = 1 + BD + BD * BD
    j0 = i_t * BT
    i_s = j0 // SEG
    o_i = tl.arange(0, BT)
    o_j = j0 + o_i
    m_j = o_j < T
    o_d = tl.arange(0, BD)
    o_r = tl.arange(0, RA * BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    q, k, v, m = _head_inputs(q, k, v, m, i_b, i_h, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_mb, s_mh)
    do, rd, gd = _head_output_grads(do, rd, gd, i_b, i_h, s_db, s_dh, T, H)
    dk += ((i_v * B + i_b) * T * H + i_h) * D
    dv += i_b * T * H * DV + i_h * DV
    slot = (i_bh * NS + i_s).to(tl.int64)  # hs can exceed 2^31 elements
    p_h = hs + slot * FP * DV
    p_z = zs + slot * FP
    c_share = (i_v == 0).to(tl.float32)

    b_k = _columns(k, o_j, m_j, 0, D, s_kt, s_kd, BD)
    b_k1, b_k2 = b_k * scale1, b_k * scale2
    b_y, b_c = _load_values(v, m, m, o_j, m_j, o_v, DV, s_vt, s_vv, s_mt, HAS_MASK)
    b_cs = b_c * c_share
    # [BT, BV] dL/d(m v); [BT, BD] dL/dk in units of scale1 and of 2 scale2, as in the dq kernel
    b_h1 = tl.load(p_h + (1 + o_d[:, None]) * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
    b_dy = _dot(b_k1, b_h1, None, DOT_PRECISION) + tl.load(p_h + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    b_dk1 = _dot(b_y, tl.trans(b_h1), None, DOT_PRECISION) + b_cs[:, None] * tl.load(p_z + 1 + o_d)[None, :]
    b_dk2 = tl.zeros([BT, BD], dtype=tl.float32)
    for a0 in range(0, D, RA):
        b_ka = _columns(k, o_j, m_j, a0, D, s_kt, s_kd, RA) * scale2
        rows = 1 + BD + a0 * BD + o_r
        b_h2 = tl.load(p_h + rows[:, None] * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_dy = _dot(_second_order(b_ka, b_k2, BT, RA, BD, DOT_PRECISION), b_h2, b_dy, DOT_PRECISION)
        b_u = _dot(b_y, tl.trans(b_h2), None, DOT_PRECISION) + b_cs[:, None] * tl.load(p_z + rows)[None, :]
        b_dk2 += _fold_second_order(b_u, b_ka, BT, RA, BD)
    for t0 in range(j0, tl.minimum(i_s * SEG + SEG, T), BT):
        o_t = t0 + o_i
        m_t = o_t < T
        b_q1 = _columns(q, o_t, m_t, 0, D, s_qt, s_qd, BD) * scale1
        b_g, b_gd = _load_values(do, rd, gd, o_t, m_t, o_v, DV, s_dt, s_dv, H, True)
        # [BT keys, BT queries]: query t sees key j <= t
        later = o_j[:, None] <= o_t[None, :]
        b_s = _dot(b_k1, tl.trans(b_q1), None, DOT_PRECISION)
        b_dy = _dot(tl.where(later, 1 + b_s + 0.5 * b_s * b_s, 0.0), b_g, b_dy, DOT_PRECISION)
        b_ds = _dot(b_y, tl.trans(b_g), None, DOT_PRECISION) + b_cs[:, None] * b_gd[None, :]
        b_ds = tl.where(later, b_ds * (1 + b_s), 0.0)
        b_dk1 = _dot(b_ds, b_q1, b_dk1, DOT_PRECISION)
    if HAS_MASK:
        b_dy *= tl.load(m + o_j * s_mt, mask=m_j, other=0.0).to(tl.float32)[:, None]
    tl.store(dv + o_j[:, None] * H * DV + o_v[None, :], b_dy.to(dv.dtype.element_ty),
             mask=m_j[:, None] & m_v[None, :])
    b_dk = b_dk1 * scale1 + b_dk2 * (2 * scale2)
    tl.store(dk + o_j[:, None] * H * D + o_d[None, :], b_dk.to(dk.dtype.element_ty),
             mask=m_j[:, None] & (o_d < D)[None, :])


# --- launchers ------------------------------------------------------------------------------------------------------


def _plan(d, value_dim, chunk, segment, block_v):
    """-> BT, SEG, BD, RA, BV of a launch (chunk, segment, block_v: overrides, e.g. the tests' small blocks)."""
    bt = chunk or BLOCK_T
    seg = segment or max(SEGMENT, bt)
    if seg % bt:
        raise ValueError(f"segment={seg} must be a multiple of chunk={bt}")
    bd = block_size(d)
    return bt, seg, bd, max(1, STATE_ROWS // bd), block_size(value_dim, block_v or BLOCK_V)


def _segment_states(x, y, w, c, start, reverse, want_final, chunk, seg, ra):
    """Pass 1 over x [B, T, H, d] and values w y [B, T, H, Dv] (normaliser weights c): (hs, zs) in the padded layout,
    and the final state in the reference layout (kv [B, H, F, Dv], z [B, H, F], fp32) when want_final."""
    batch, length, heads, d = x.shape
    value_dim = y.shape[-1]
    bd = block_size(d)
    padded = 1 + bd + bd * bd
    ns = cdiv(length, seg)
    precision = dot_precision(x, y)
    hs_dtype = torch.float32 if precision == "ieee" else torch.bfloat16
    hs = x.new_empty(batch * heads, ns, padded, value_dim, dtype=hs_dtype)
    zs = x.new_empty(batch * heads, ns, padded, dtype=torch.float32)
    final = None
    if want_final:
        num_features = taylor_num_features(d)
        final = (x.new_empty(batch, heads, num_features, value_dim, dtype=torch.float32),
                 x.new_empty(batch, heads, num_features, dtype=torch.float32))
    bv = block_size(value_dim, BLOCK_V_STATES)
    w_, s_w = _token_weights(w, x)
    taylor_segment_states_kernel[(1 + cdiv(d, ra), cdiv(value_dim, bv), batch * heads)](
        x, y, w_, w_ if c is None else c, *_state_args(start, x), hs, zs, *(final or (x, x)),
        *x.stride(), *y.stride(), *s_w, length, heads, d, value_dim, seg, d**-0.25, (2 * d) ** -0.25,
        BT=chunk, BD=bd, RA=ra, BV=bv, WEIGHTED=w is not None, HAS_INITIAL_STATE=start is not None,
        STORE_FINAL_STATE=want_final, REVERSE=reverse, DOT_PRECISION=precision,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return hs, zs, final


def _two_pass_fwd(q, k, v, mask, start, output_final_state, eps, chunk, segment, block_v):
    batch, length, heads, d = q.shape
    value_dim = v.shape[-1]
    bt, seg, bd, ra, bv = _plan(d, value_dim, chunk, segment, block_v)
    hs, zs, final = _segment_states(k, v, mask, None, start, False, output_final_state, bt, seg, ra)
    o = v.new_empty(batch, length, heads, value_dim)
    den = q.new_empty(batch, length, heads, dtype=torch.float32)
    m, s_m = _token_weights(mask, q)
    taylor_output_kernel[(cdiv(value_dim, bv), cdiv(length, bt), batch * heads)](
        q, k, v, m, hs, zs, o, den, *q.stride(), *k.stride(), *v.stride(), *s_m,
        length, heads, d, value_dim, seg, eps, d**-0.25, (2 * d) ** -0.25,
        BT=bt, BD=bd, RA=ra, BV=bv, HAS_MASK=mask is not None, DOT_PRECISION=dot_precision(q, k, v),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return o, den, final


def _two_pass_bwd(q, k, v, mask, start, o, den, do, dfinal, need_dstart, eps, chunk, segment, block_v):
    batch, length, heads, d = q.shape
    value_dim = v.shape[-1]
    bt, seg, bd, ra, bv = _plan(d, value_dim, chunk, segment, block_v)
    rd, gd = normaliser_grads(o, do, den, eps)
    hs, zs, _ = _segment_states(k, v, mask, None, start and _symmetric(start, d), False, False, bt, seg, ra)
    symmetric_dfinal = dfinal and _symmetric(dfinal, d)
    dhs, dzs, dstart = _segment_states(q, do, rd, gd, symmetric_dfinal, True, need_dstart, bt, seg, ra)
    nv = cdiv(value_dim, bv)
    # with several value blocks, dq and dk are fp32 partial sums [NV, B, T, H, d]
    dq = q.new_empty(batch, length, heads, d) if nv == 1 else q.new_empty(nv, *q.shape, dtype=torch.float32)
    dk = k.new_empty(batch, length, heads, d) if nv == 1 else k.new_empty(nv, *k.shape, dtype=torch.float32)
    dv = v.new_empty(batch, length, heads, value_dim)
    m, s_m = _token_weights(mask, q)
    args = (
        *q.stride(), *k.stride(), *v.stride(), *s_m, *do.stride(),
        batch, length, heads, d, value_dim, seg, d**-0.25, (2 * d) ** -0.25,
    )
    meta = dict(BT=bt, BD=bd, RA=ra, BV=bv, HAS_MASK=mask is not None, DOT_PRECISION=dot_precision(q, k, v),
                num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    grid = (nv, cdiv(length, bt), batch * heads)
    taylor_bwd_dq_kernel[grid](q, k, v, m, do, rd, gd, hs, zs, dq, *args, **meta)
    taylor_bwd_dkv_kernel[grid](q, k, v, m, do, rd, gd, dhs, dzs, dk, dv, *args, **meta)
    if nv > 1:
        dq, dk = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype)
    if need_dstart and dfinal is not None:
        # the final state passes its gradient on unchanged, the part the symmetrised readouts dropped included
        dstart = tuple(a + b - c for a, b, c in zip(dstart, dfinal, symmetric_dfinal))
    return dq, dk, dv, dstart
