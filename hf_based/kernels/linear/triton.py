"""Triton kernels for `linear_attention` (materialised features, e.g. hedgehog) and its decode step.

Chunked, sequence-parallel forward:
  1. `linear_attention_moments_kernel`, per (b, h, chunk): the chunk's moments K_c^T V_c [F, Dv] and 1^T K_c [F].
  2. `linear_attention_scan_kernel`, per (b, h, slice of the state): an in-place exclusive scan over chunks that turns
     the moments into each chunk's start state (+ initial_state) and yields the final state.
  3. `linear_attention_fwd_kernel`, per (b, h, chunk, v-block): intra-chunk causal quadratic part + q_c @ start state,
     divided by the denominator.
The backward runs the same two passes in reverse over (q, [g, gd]), g_t = do_t / den_t, gd_t = -(do_t . o_t) / den_t,
whose suffix sums are the state gradients, then `linear_attention_bwd_dqk_kernel` and `linear_attention_bwd_dv_kernel`
per chunk. The states are fp32, except bf16 inputs' per-chunk states (bf16: they are read and written four times,
so they set the speed; the running sums stay fp32 in registers).
Tiles are addressed by explicit pointers, masked (zero-padded) past T, F and Dv; a chunk's row indices o_t are int64,
since a row index times the row stride can pass 2^31 in long sequences.
"""

import torch
import triton
import triton.language as tl

from hf_based.kernels._checks import (
    accumulation_dtype,
    check_positive_int,
    check_shape,
    kernel_dtype,
    prepare_state,
)
from hf_based.kernels.triton_utils import block_size, cdiv, dot_precision, unit_last_dim, use_decode_kernel

BLOCK_K = 64  # feature block of the chunk kernels (the cap: smaller F use one block of F rounded up)
BLOCK_V = 64  # value block of the chunk kernels
SCAN_BLOCK_N, SCAN_BLOCK_U = 1024, 4  # state elements x chunks per step of the scan


@triton.jit
def linear_attention_moments_kernel(
    x, y, r, c, h, z,
    s_xb, s_xt, s_xh, s_yb, s_yt, s_yh, s_rb, s_rh,
    T, H, NT,
    F: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_R: tl.constexpr, HAS_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """h[c] = sum_t x_t (r_t y_t)^T and z[c] = sum_t c_t x_t over the chunk's rows (r, c = 1 where not HAS_*)."""
    i_kv, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // tl.cdiv(DV, BV), i_kv % tl.cdiv(DV, BV)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = o_t < T, o_k < F, o_v < DV

    p_x = x + i_b * s_xb + i_h * s_xh + o_t[:, None] * s_xt + o_k[None, :]
    p_y = y + i_b * s_yb + i_h * s_yh + o_t[:, None] * s_yt + o_v[None, :]
    # [BT, BK]
    b_x = tl.load(p_x, mask=m_t[:, None] & m_k[None, :], other=0)
    # [BT, BV]
    b_y = tl.load(p_y, mask=m_t[:, None] & m_v[None, :], other=0)
    if HAS_R:
        b_r = tl.load(r + i_b * s_rb + i_h * s_rh + o_t, mask=m_t, other=0)
        b_y = (b_y * b_r[:, None]).to(b_x.dtype)
    # [BK, BV]
    b_h = tl.dot(tl.trans(b_x), b_y, input_precision=DOT_PRECISION)
    i_c = i_bh.to(tl.int64) * NT + i_t
    p_h = h + i_c * F * DV + o_k[:, None] * DV + o_v[None, :]
    tl.store(p_h, b_h.to(h.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])
    if i_v == 0:
        b_cx = b_x.to(tl.float32)
        if HAS_C:
            b_cx *= tl.load(c + i_b * s_rb + i_h * s_rh + o_t, mask=m_t, other=0)[:, None]
        tl.store(z + i_c * F + o_k, tl.sum(b_cx, 0), mask=m_k)


@triton.jit
def linear_attention_scan_kernel(
    h, h0, ht, NT, N,
    BU: tl.constexpr, BN: tl.constexpr, REVERSE: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
):
    """In place over h [BH, NT, N]: chunk moments -> the state before each chunk (after it if REVERSE), from h0 [BH, N];
    the total goes to ht [BH, N]. BU chunks per step keep enough loads in flight to stream at memory speed."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    if HAS_INITIAL_STATE:
        b_s = tl.load(h0 + i_bh * N + o_n, mask=m_n, other=0).to(tl.float32)
    else:
        b_s = tl.zeros([BN], dtype=tl.float32)
    for i in range(tl.cdiv(NT, BU)):
        o_u = i * BU + tl.arange(0, BU)
        o_c = NT - 1 - o_u if REVERSE else o_u  # the scan runs down o_u, through the chunks in (reverse) time order
        p_h = h + (i_bh * NT + o_c[:, None]) * N + o_n[None, :]
        m_h = (o_u < NT)[:, None] & m_n[None, :]
        # [BU, BN]
        b_m = tl.load(p_h, mask=m_h, other=0).to(tl.float32)
        b_c = tl.cumsum(b_m, 0)
        tl.store(p_h, (b_s[None, :] + b_c - b_m).to(p_h.dtype.element_ty), mask=m_h)
        b_s += tl.sum(b_m, 0)
    if STORE_FINAL_STATE:
        tl.store(ht + i_bh * N + o_n, b_s, mask=m_n)


@triton.jit
def linear_attention_fwd_kernel(
    q, k, v, m, h, z, o, rden,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh, s_mb,
    T, H, NT, eps,
    F: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_c = i_bh.to(tl.int64) * NT + i_t
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < T, o_v < DV

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    b_den = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(F, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < F
        p_q = q + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :]
        p_k = k + i_b * s_kb + i_h * s_kh + o_t[:, None] * s_kt + o_k[None, :]
        p_h = h + i_c * F * DV + o_k[:, None] * DV + o_v[None, :]
        # [BT, BK]
        b_q = tl.load(p_q, mask=m_t[:, None] & m_k[None, :], other=0)
        b_k = tl.load(p_k, mask=m_t[:, None] & m_k[None, :], other=0)
        # [BK, BV]
        b_h = tl.load(p_h, mask=m_k[:, None] & m_v[None, :], other=0)
        # [BK]
        b_z = tl.load(z + i_c * F + o_k, mask=m_k, other=0)
        b_A = tl.dot(b_q, tl.trans(b_k), b_A, input_precision=DOT_PRECISION)
        b_o = tl.dot(b_q.to(b_h.dtype), b_h, b_o, input_precision=DOT_PRECISION)
        b_den += tl.sum(b_q.to(tl.float32) * b_z[None, :], 1)
    if HAS_MASK:  # padded keys drop out of the intra-chunk part; the states never had them
        b_A *= tl.load(m + i_b * s_mb + o_t, mask=m_t, other=0)[None, :]
    b_A = tl.where(o_t[:, None] >= o_t[None, :], b_A, 0)
    b_den += tl.sum(b_A, 1)
    m_tv = m_t[:, None] & m_v[None, :]
    p_v = v + i_b * s_vb + i_h * s_vh + o_t[:, None] * s_vt + o_v[None, :]
    # [BT, BV]
    b_v = tl.load(p_v, mask=m_tv, other=0)
    b_o = tl.dot(b_A.to(b_v.dtype), b_v, b_o, input_precision=DOT_PRECISION)
    b_r = 1 / (b_den + eps)
    p_o = o + i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot + o_v[None, :]
    tl.store(p_o, (b_o * b_r[:, None]).to(o.dtype.element_ty), mask=m_tv)
    if i_v == 0:  # 1 / den: the backward's g = do / den
        tl.store(rden + i_bh.to(tl.int64) * T + o_t, b_r, mask=m_t)


@triton.jit
def linear_attention_bwd_prepare_kernel(
    o, do, rden, gd,
    s_ob, s_ot, s_oh, s_db, s_dt, s_dh,
    T, H,
    DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """gd_t = -(do_t . o_t) / den_t, the gradient of the denominator."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_s = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < DV)[None, :]
        p_o = o + i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot + o_v[None, :]
        p_do = do + i_b * s_db + i_h * s_dh + o_t[:, None] * s_dt + o_v[None, :]
        # [BT, BV]
        b_o = tl.load(p_o, mask=m_tv, other=0).to(tl.float32)
        b_do = tl.load(p_do, mask=m_tv, other=0).to(tl.float32)
        b_s += tl.sum(b_o * b_do, 1)
    p_r = i_bh.to(tl.int64) * T + o_t
    b_r = tl.load(rden + p_r, mask=m_t, other=0)
    tl.store(gd + p_r, -b_s * b_r, mask=m_t)


@triton.jit
def linear_attention_bwd_dqk_kernel(
    q, k, v, m, h, z, dh, dz, do, rden, gd, dq, dk,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh, s_gb, s_gt, s_gh, s_mb,
    T, H, NT,
    F: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq = dA @ k + g @ S^T + gd z^T and dk = m (dA^T @ q + v @ dS^T + dz), with dA = tril(g v^T + gd)."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_c = i_bh.to(tl.int64) * NT + i_t
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t, m_k = o_t < T, o_k < F
    m_tk = m_t[:, None] & m_k[None, :]

    p_q = q + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :]
    p_k = k + i_b * s_kb + i_h * s_kh + o_t[:, None] * s_kt + o_k[None, :]
    # [BT, BK]
    b_q = tl.load(p_q, mask=m_tk, other=0)
    b_k = tl.load(p_k, mask=m_tk, other=0)
    # [BT]
    b_r = tl.load(rden + i_bh.to(tl.int64) * T + o_t, mask=m_t, other=0)
    b_gd = tl.load(gd + i_bh.to(tl.int64) * T + o_t, mask=m_t, other=0)
    if HAS_MASK:
        b_m = tl.load(m + i_b * s_mb + o_t, mask=m_t, other=0)
        b_k = (b_k * b_m[:, None]).to(b_q.dtype)

    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        m_tv, m_kv = m_t[:, None] & m_v[None, :], m_k[:, None] & m_v[None, :]
        p_v = v + i_b * s_vb + i_h * s_vh + o_t[:, None] * s_vt + o_v[None, :]
        p_do = do + i_b * s_db + i_h * s_dh + o_t[:, None] * s_dt + o_v[None, :]
        p_h = h + i_c * F * DV + o_k[:, None] * DV + o_v[None, :]
        p_dh = dh + i_c * F * DV + o_k[:, None] * DV + o_v[None, :]
        # [BT, BV]
        b_v = tl.load(p_v, mask=m_tv, other=0)
        b_g = (tl.load(p_do, mask=m_tv, other=0) * b_r[:, None]).to(b_v.dtype)
        # [BK, BV]
        b_h = tl.load(p_h, mask=m_kv, other=0)
        b_dh = tl.load(p_dh, mask=m_kv, other=0)
        b_dA = tl.dot(b_g, tl.trans(b_v), b_dA, input_precision=DOT_PRECISION)
        b_dq = tl.dot(b_g.to(b_h.dtype), tl.trans(b_h), b_dq, input_precision=DOT_PRECISION)
        b_dk = tl.dot(b_v.to(b_dh.dtype), tl.trans(b_dh), b_dk, input_precision=DOT_PRECISION)
    b_dA = tl.where(o_t[:, None] >= o_t[None, :], b_dA + b_gd[:, None], 0).to(b_q.dtype)
    # [BK]
    b_z = tl.load(z + i_c * F + o_k, mask=m_k, other=0)
    b_dz = tl.load(dz + i_c * F + o_k, mask=m_k, other=0)
    b_dq = tl.dot(b_dA, b_k, b_dq, input_precision=DOT_PRECISION) + b_gd[:, None] * b_z[None, :]
    b_dk = tl.dot(tl.trans(b_dA), b_q, b_dk, input_precision=DOT_PRECISION) + b_dz[None, :]
    if HAS_MASK:
        b_dk *= b_m[:, None]
    # dq and dk share one (contiguous) layout
    p_g = i_b * s_gb + i_h * s_gh + o_t[:, None] * s_gt + o_k[None, :]
    tl.store(dq + p_g, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_g, b_dk.to(dk.dtype.element_ty), mask=m_tk)


@triton.jit
def linear_attention_bwd_dv_kernel(
    q, k, m, dh, do, rden, dv,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_db, s_dt, s_dh, s_vb, s_vt, s_vh, s_mb,
    T, H, NT,
    F: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dv = tril(q k^T)^T @ g + k @ dS."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_c = i_bh.to(tl.int64) * NT + i_t
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < T, o_v < DV

    # [BT, BT], A^T: rows are keys
    b_At = tl.zeros([BT, BT], dtype=tl.float32)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(F, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < F
        p_q = q + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :]
        p_k = k + i_b * s_kb + i_h * s_kh + o_t[:, None] * s_kt + o_k[None, :]
        p_dh = dh + i_c * F * DV + o_k[:, None] * DV + o_v[None, :]
        # [BT, BK]
        b_q = tl.load(p_q, mask=m_t[:, None] & m_k[None, :], other=0)
        b_k = tl.load(p_k, mask=m_t[:, None] & m_k[None, :], other=0)
        # [BK, BV]
        b_dh = tl.load(p_dh, mask=m_k[:, None] & m_v[None, :], other=0)
        b_At = tl.dot(b_k, tl.trans(b_q), b_At, input_precision=DOT_PRECISION)
        b_dv = tl.dot(b_k.to(b_dh.dtype), b_dh, b_dv, input_precision=DOT_PRECISION)
    b_At = tl.where(o_t[:, None] <= o_t[None, :], b_At, 0)
    m_tv = m_t[:, None] & m_v[None, :]
    p_do = do + i_b * s_db + i_h * s_dh + o_t[:, None] * s_dt + o_v[None, :]
    b_r = tl.load(rden + i_bh.to(tl.int64) * T + o_t, mask=m_t, other=0)
    # [BT, BV]
    b_do = tl.load(p_do, mask=m_tv, other=0)
    b_g = (b_do * b_r[:, None]).to(b_do.dtype)
    b_dv = tl.dot(b_At.to(b_g.dtype), b_g, b_dv, input_precision=DOT_PRECISION)
    if HAS_MASK:  # k_j enters dv_j through m_j k_j
        b_dv *= tl.load(m + i_b * s_mb + o_t, mask=m_t, other=0)[:, None]
    p_dv = dv + i_b * s_vb + i_h * s_vh + o_t[:, None] * s_vt + o_v[None, :]
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_tv)


@triton.jit
def linear_attention_recurrent_fwd_kernel(
    q, k, v, m, h0, z0, o, ht, zt,
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_ob, s_oh, s_mb,
    H, eps,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
):
    """One decode step per (b, h, v-block): fold key t into the fp32 state, read it out with q_t."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < F, o_v < DV
    m_h = m_k[:, None] & m_v[None, :]
    p_h = i_bh.to(tl.int64) * F * DV + o_k[:, None] * DV + o_v[None, :]
    p_z = i_bh.to(tl.int64) * F + o_k

    # [BK]
    b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_k, mask=m_k, other=0).to(tl.float32)
    b_k = tl.load(k + i_b * s_kb + i_h * s_kh + o_k, mask=m_k, other=0).to(tl.float32)
    if HAS_MASK:
        b_k *= tl.load(m + i_b * s_mb)
    # [BV]
    b_v = tl.load(v + i_b * s_vb + i_h * s_vh + o_v, mask=m_v, other=0).to(tl.float32)
    # [BK, BV]
    b_h = b_k[:, None] * b_v[None, :]
    b_z = b_k
    if HAS_INITIAL_STATE:
        b_h += tl.load(h0 + p_h, mask=m_h, other=0)
        b_z += tl.load(z0 + p_z, mask=m_k, other=0)
    b_o = tl.sum(b_q[:, None] * b_h, 0) / (tl.sum(b_q * b_z) + eps)
    tl.store(o + i_b * s_ob + i_h * s_oh + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL_STATE:
        tl.store(ht + p_h, b_h, mask=m_h)
        if i_v == 0:
            tl.store(zt + p_z, b_z, mask=m_k)


def _chunk_size(chunk_size: int, length: int) -> int:
    """The kernels' chunk: chunk_size rounded up to a power of 2 in [16, 128], no longer than T needs."""
    return min(block_size(chunk_size, 128), block_size(length, 128))


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _chunk_states(x, y, r, c, initial, BT, reverse=False, store_final=False):
    """Chunk start states of kv = sum_t x_t (r_t y_t)^T [F, Dv] and z = sum_t c_t x_t [F], from `initial`
    (kv [B, H, F, Dv], z [B, H, F] fp32, or None) on, backwards in time if `reverse`.

    x [B, T, H, F], y [B, T, H, Dv]; r, c: per-row weights, [B, T] or [B, H, T] fp32, or None for 1.
    Returns h [BH, NT, F, Dv] (the state dtype), z [BH, NT, F] fp32 and the total (kv, z) fp32 or None.
    """
    B, T, H, F = x.shape
    DV = y.shape[-1]
    NT = cdiv(T, BT)
    BK, BV = block_size(F, BLOCK_K), block_size(DV, BLOCK_V)
    h = x.new_empty(B * H, NT, F, DV, dtype=_state_dtype(x.dtype))
    z = x.new_empty(B * H, NT, F, dtype=torch.float32)
    weights = r if r is not None else c  # r and c share one layout
    s_rb, s_rh = (0, 0) if weights is None else (weights.stride(0), weights.stride(1) if weights.dim() == 3 else 0)
    linear_attention_moments_kernel[(cdiv(F, BK) * cdiv(DV, BV), NT, B * H)](
        x, y, r, c, h, z,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2), s_rb, s_rh,
        T, H, NT,
        F=F, DV=DV, BT=BT, BK=BK, BV=BV, HAS_R=r is not None, HAS_C=c is not None,
        DOT_PRECISION=dot_precision(x), num_warps=4,
    )
    final = None
    if store_final:
        final = (x.new_empty(B, H, F, DV, dtype=torch.float32), x.new_empty(B, H, F, dtype=torch.float32))
    for state, state0, statet in zip((h, z), initial or (None, None), final or (None, None)):
        N = state[0, 0].numel()
        BN = block_size(N, SCAN_BLOCK_N, minimum=1)
        linear_attention_scan_kernel[(cdiv(N, BN), B * H)](
            state, state0, statet, NT, N,
            BU=SCAN_BLOCK_U, BN=BN, REVERSE=reverse, HAS_INITIAL_STATE=initial is not None,
            STORE_FINAL_STATE=store_final,
        )
    return h, z, final


class LinearAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, kv0, z0, eps, BT, output_final_state):
        B, T, H, F = q.shape
        DV = v.shape[-1]
        NT = cdiv(T, BT)
        initial = None if kv0 is None else (kv0, z0)
        h, z, final = _chunk_states(k, v, key_mask, key_mask, initial, BT, store_final=output_final_state)
        o = v.new_empty(B, T, H, DV)
        rden = q.new_empty(B, H, T, dtype=torch.float32)
        BV = block_size(DV, BLOCK_V)
        linear_attention_fwd_kernel[(cdiv(DV, BV), NT, B * H)](
            q, k, v, key_mask, h, z, o, rden,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            0 if key_mask is None else key_mask.stride(0),
            T, H, NT, eps,
            F=F, DV=DV, BT=BT, BK=block_size(F, BLOCK_K), BV=BV, HAS_MASK=key_mask is not None,
            DOT_PRECISION=dot_precision(q), num_warps=4,
        )
        ctx.save_for_backward(q, k, v, o, key_mask, kv0, z0, rden)
        ctx.BT = BT
        return (o, *(final or (None, None)))

    @staticmethod
    def backward(ctx, do, dkvt, dzt):
        q, k, v, o, key_mask, kv0, z0, rden = ctx.saved_tensors
        BT = ctx.BT
        B, T, H, F = q.shape
        DV = v.shape[-1]
        NT = cdiv(T, BT)
        do = unit_last_dim(do)
        gd = torch.empty_like(rden)
        BV = block_size(DV, BLOCK_V)
        linear_attention_bwd_prepare_kernel[(NT, B * H)](
            o, do, rden, gd,
            o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
            T, H,
            DV=DV, BT=BT, BV=BV,
        )
        initial = None if kv0 is None else (kv0, z0)
        h, z, _ = _chunk_states(k, v, key_mask, key_mask, initial, BT)
        # the final state's gradient enters the reverse scan where the forward's initial state entered the scan
        dfinal = None
        if dkvt is not None or dzt is not None:
            dfinal = (
                torch.zeros(B, H, F, DV, device=q.device) if dkvt is None else dkvt.float().contiguous(),
                torch.zeros(B, H, F, device=q.device) if dzt is None else dzt.float().contiguous(),
            )
        want_d0 = kv0 is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
        dh, dz, d0 = _chunk_states(q, do, rden, gd, dfinal, BT, reverse=True, store_final=want_d0)

        dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
        s_m = 0 if key_mask is None else key_mask.stride(0)
        meta = dict(F=F, DV=DV, BT=BT, HAS_MASK=key_mask is not None, DOT_PRECISION=dot_precision(q))
        BK = block_size(F, BLOCK_K)
        linear_attention_bwd_dqk_kernel[(cdiv(F, BK), NT, B * H)](
            q, k, v, key_mask, h, z, dh, dz, do, rden, gd, dq, dk,
            *strides, v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), s_m,
            T, H, NT, BK=BK, BV=block_size(DV, BLOCK_V), num_warps=4, **meta,
        )
        linear_attention_bwd_dv_kernel[(cdiv(DV, BV), NT, B * H)](
            q, k, key_mask, dh, do, rden, dv,
            *strides, do.stride(0), do.stride(1), do.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), s_m,
            T, H, NT, BK=BK, BV=BV, num_warps=4, **meta,
        )
        dkv0, dz0 = d0 if want_d0 else (None, None)
        return dq, dk, dv, None, dkv0, dz0, None, None, None


def _prepare(q, k, v, key_mask, initial_state):
    """Validate like the reference; -> q, k, v (in `kernel_dtype`, fp64 -> fp32), key mask (fp32) and state (fp32)
    or None."""
    batch, length, heads, num_features = check_shape("q", q, "batch, time, heads, features")
    check_shape("k", k, "batch, time, heads, features", (batch, length, heads, num_features))
    value_dim = check_shape("v", v, "batch, time, heads, value_dim", (batch, length, heads, None))[-1]
    if key_mask is not None:
        check_shape("key_mask", key_mask, "batch, time", (batch, length))
        key_mask = key_mask.to(torch.float32).contiguous()
    if initial_state is not None:
        kv, z = prepare_state(initial_state, batch, heads, num_features, value_dim, torch.float32, q.device)
        initial_state = (kv.contiguous(), z.contiguous())
    dtype = kernel_dtype(q, k, v) or torch.float32
    q, k, v = (unit_last_dim(x.to(dtype)) for x in (q, k, v))
    return q, k, v, key_mask, initial_state


def _result(o, kvt, zt, output_final_state, out_dtype, state_dtype):
    return o.to(out_dtype), ((kvt.to(state_dtype), zt.to(state_dtype)) if output_final_state else None)


def _chunked(q, k, v, key_mask, initial_state, output_final_state, eps, chunk_size, out_dtype, state_dtype):
    """The chunked op on `_prepare`d inputs; -> the reference's result."""
    kv0, z0 = initial_state or (None, None)
    BT = _chunk_size(chunk_size, q.shape[1])
    o, kvt, zt = LinearAttentionFunction.apply(q, k, v, key_mask, kv0, z0, eps, BT, output_final_state)
    return _result(o, kvt, zt, output_final_state, out_dtype, state_dtype)


def linear_attention(q, k, v, key_mask=None, initial_state=None, output_final_state=False, eps=1e-12, chunk_size=64):
    """Chunked causal normalised linear attention; same arguments and result as the reference `linear_attention`.

    chunk_size sets the kernels' chunk, rounded up to a power of 2 in [16, 128].
    """
    check_positive_int("chunk_size", chunk_size)
    out_dtype, state_dtype = v.dtype, accumulation_dtype(q, k, v)
    prepared = _prepare(q, k, v, key_mask, initial_state)
    return _chunked(*prepared, output_final_state, eps, chunk_size, out_dtype, state_dtype)


def linear_attention_recurrent(q, k, v, key_mask=None, initial_state=None, output_final_state=False, eps=1e-12):
    """Decode form; same arguments and result as the reference `linear_attention_recurrent`.

    T == 1 without autograd: one fused kernel that reads the fp32 state once and writes the next one (no host sync,
    static shapes: CUDA-graph friendly). Otherwise the chunked op, which is the same function of the inputs.
    """
    out_dtype, state_dtype = v.dtype, accumulation_dtype(q, k, v)
    q, k, v, key_mask, initial_state = _prepare(q, k, v, key_mask, initial_state)
    kv0, z0 = initial_state or (None, None)
    if not use_decode_kernel(q, k, v, kv0, z0):
        return _chunked(q, k, v, key_mask, initial_state, output_final_state, eps, 64, out_dtype, state_dtype)
    B, _, H, F = q.shape
    DV = v.shape[-1]
    o = v.new_empty(B, 1, H, DV)
    kvt = zt = None
    if output_final_state:
        kvt, zt = q.new_empty(B, H, F, DV, dtype=torch.float32), q.new_empty(B, H, F, dtype=torch.float32)
    BK = block_size(F, minimum=1)
    BV = block_size(DV, max(4096 // BK, 16), minimum=1)
    linear_attention_recurrent_fwd_kernel[(cdiv(DV, BV), B * H)](
        q, k, v, key_mask, kv0, z0, o, kvt, zt,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2), o.stride(0), o.stride(2),
        0 if key_mask is None else key_mask.stride(0),
        H, eps,
        F=F, DV=DV, BK=BK, BV=BV,
        HAS_MASK=key_mask is not None, HAS_INITIAL_STATE=kv0 is not None, STORE_FINAL_STATE=output_final_state,
    )
    return _result(o, kvt, zt, output_final_state, out_dtype, state_dtype)
