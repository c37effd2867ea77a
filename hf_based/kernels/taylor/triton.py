"""Triton BASED Taylor linear attention for [batch, time, heads, dim] tensors.

Same signatures and semantics as taylor_linear_attention(_recurrent) in hf_based/kernels/taylor/reference.py: outputs
in v.dtype, states (kv [B, H, F, Dv], z [B, H, F], F = 1 + d + d^2) in fp32 and in the reference's feature order.

Features. With x1 = x / d^(1/4) and x2 = x / (2d)^(1/4), phi(x) = [1, x1, vec(x2 x2^T)] is the reference's map, so
phi(q).phi(k) = 1 + s + s^2/2 with s = q1.k1, and the kernels keep the state exactly in the reference's layout, split
into h0 [BV], h1 [BV, BD] (transposed, so that its products fill the matrix units' rows), h2 [BD*BD, BV] (row
a*BD + b holds feature (a, b)) and z0, z1 [BD], z2 [BD, BD] (BD = d rounded up to a power of 2 >= 16, padded
features are zero). A chunk's second-order features
vec(x2 x2^T) [BT, BD*BD] exist only on chip; device memory never holds the 1 + d + d^2 expansion.

Forward, with T cut into NS segments of SEG tokens (a multiple of the chunk BT) for sequence parallelism:
1. taylor_state_kernel, grid (NV, NS - 1, B*H): one segment's moments sum_t phi(k_t) (m_t v_t)^T and
   sum_t phi(k_t) m_t into slot p + 1 of a [B, H, NS, F, Dv] buffer whose slot 0 holds the initial state; an
   in-place cumsum over the slots then gives every segment its starting state.
2. taylor_fwd_kernel, grid (NV, NS, B*H): scans the chunks of one segment from its starting state. Per chunk:
   intra-chunk P = (1 + S + S^2/2) causal, num = P @ (m v), den = P @ m; inter-chunk phi(q) @ state (the d^2 part
   as one [BT, BD*BD] @ [BD*BD, BV] tensor-core product); o = num / (den + eps) is written once, in v.dtype; den is
   kept (fp32 [B, T, H]) for the backward; the last segment writes the final state.

Backward, with g_t = do_t / (den_t + eps) and gd_t = -(do_t . o_t) / (den_t + eps), so that dL/dK_tj =
g_t . v_j + gd_t for the kernel value K_tj = m_j phi(q_t).phi(k_j):
- shared.py's taylor_bwd_preprocess_kernel: rd = 1 / (den + eps) and gd per token;
- dq_t = d^(-1/4) sum_{j<=t} dL/dK_tj (1 + s_tj) k1_j: the forward's scan again (taylor_bwd_dq_kernel, starting
  states recomputed by step 1), reading the state out as the gradient of phi(q_t).(kv g_t + z gd_t);
- dv_j = m_j sum_{t>=j} K_tj g_t and dk_j = d^(-1/4) m_j sum_{t>=j} dL/dK_tj (1 + s_tj) q1_t: the same scan in
  reverse time with the roles of q and k swapped (taylor_bwd_dkv_kernel), over the moments of q with g and gd, which
  start from the final state's gradient and end as the initial state's gradient.
The d^2 readouts of the gradients treat the second-order block as symmetric (true of every state the keys build);
states that come from outside (initial state, final state's gradient) are symmetrised first.
dq and dk sum over the value blocks: with NV > 1 each block writes an fp32 partial, summed afterwards.

The decode step (T = 1, no autograd) is taylor_recurrent_fwd_kernel, grid (NV, B*H): the state is read once, the key
folded in, the query read out, and the new state written to new tensors (the inputs are never updated in place, as in
the reference; no host sync, so it can be captured in a CUDA graph). Longer inputs, and inputs that need gradients,
take the chunked op. fp64 inputs and d > 32 run the reference.
"""

import math

import torch
import triton
import triton.language as tl

from hf_based.kernels._checks import accumulation_dtype, check_shape, prepare_state
from hf_based.kernels.feature_maps import taylor_num_features
from hf_based.kernels.taylor.reference import taylor_linear_attention as taylor_linear_attention_reference
from hf_based.kernels.taylor.reference import (
    taylor_linear_attention_recurrent as taylor_linear_attention_recurrent_reference,
)
from hf_based.kernels.taylor.shared import (
    ChunkedTaylorFunction,
    _dot,
    _head_inputs,
    _head_output_grads,
    _load_values,
    _state_args,
    _symmetric,
    _token_weights,
    normaliser_grads,
)
from hf_based.kernels.taylor.two_pass import _two_pass_bwd, _two_pass_fwd
from hf_based.kernels.triton_utils import block_size, cdiv, dot_precision, use_decode_kernel

# Block sizes (powers of 2, >= 16). Tests shrink them so that small problems cover several chunks and segments.
# Checked on an H200 (Triton 3.6, bf16 and fp32, d = 16 and 32): chunk 32, BV 32 (16 for d = 32), 4 warps per 16 of
# BD, the backward unpipelined and h2 read untransposed (_grad_readout). With chunk 64 at d = 16 the bf16 backward
# returned NaN or faulted (illegal address) in every variant tried; re-check bf16 gradients on a GPU after any change.
# Measured there at B=8, H=16, d=16, Dv=64, T=16k, bf16: forward 4.6 ms, forward + backward 17.8 ms (every scan
# kernel spills registers; the state pass, which does not, is the cheap part).
BLOCK_T = 32  # chunk length
BLOCK_V = 32  # forward: value columns per program
BLOCK_V_BWD = 32  # backward: value columns per program
BLOCK_V_DECODE = 32  # decode: value columns per program
STATE_BUDGET = 16384  # fp32 elements of the on-chip h2 = BD*BD*BV: BV shrinks for d = 32
NUM_WARPS = 4  # for d <= 16; 8 for d = 32, whose chunk features [BT, 1024] are 4x larger
NUM_STAGES = 2  # software-pipelining depth of the forward scans' loads (H200 sweep: fwd 3.8 ms at 2, 4.6 at 3)
NUM_STAGES_BWD = 1  # see above
PROGRAMS_PER_SM = 4  # segments are cut so that a scan launch has about this many programs per multiprocessor
MIN_SEGMENT = 512  # tokens: shorter segments would spend more on the segment pass than they win
MAX_DIM = 32  # larger d: the d^2 features no longer fit on chip, the reference runs
# The chunked op's algorithms: "scan" (this module's kernels) or "two_pass" (two_pass.py: segment states by feature
# block, then every chunk in parallel). The scan stays the default until the two-pass kernels are timed and their
# bf16 results checked on a GPU (benchmarks/bench_kernels.py runs both).
ALGORITHMS = ("scan", "two_pass")
ALGORITHM = "scan"

SQRT2 = tl.constexpr(math.sqrt(2.0))


# --- the scan's tiles (shared.py has those of both algorithms) ------------------------------------------------------


@triton.jit
def _state_offsets(D, BD: tl.constexpr):
    """Rows of the reference state (and their masks) for h1 [BD], h2 [BD*BD] and z2 [BD, BD]."""
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BD * BD)
    r1 = 1 + o_d
    r2 = 1 + D + (o_f // BD) * D + o_f % BD
    rz2 = 1 + D + o_d[:, None] * D + o_d[None, :]
    m1 = o_d < D
    return r1, m1, r2, ((o_f // BD) < D) & ((o_f % BD) < D), rz2, m1[:, None] & m1[None, :]


@triton.jit
def _load_state(kv, z, o_v, D, DV, BD: tl.constexpr, BV: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr):
    """kv [F, DV] (columns o_v) and z [F] -> h0 [BV], h1 [BV, BD], h2 [BD*BD, BV], z0, z1 [BD], z2 [BD, BD]."""
    if HAS_INITIAL_STATE:
        r1, m1, r2, m2, rz2, mz2 = _state_offsets(D, BD)
        m_v = o_v < DV
        b_h0 = tl.load(kv + o_v, mask=m_v, other=0.0)
        b_h1 = tl.load(kv + r1[None, :] * DV + o_v[:, None], mask=m1[None, :] & m_v[:, None], other=0.0)
        b_h2 = tl.load(kv + r2[:, None] * DV + o_v[None, :], mask=m2[:, None] & m_v[None, :], other=0.0)
        b_z0 = tl.load(z)
        b_z1 = tl.load(z + r1, mask=m1, other=0.0)
        b_z2 = tl.load(z + rz2, mask=mz2, other=0.0)
    else:
        b_h0 = tl.zeros([BV], dtype=tl.float32)
        b_h1 = tl.zeros([BV, BD], dtype=tl.float32)
        b_h2 = tl.zeros([BD * BD, BV], dtype=tl.float32)
        b_z0 = tl.zeros([], dtype=tl.float32)
        b_z1 = tl.zeros([BD], dtype=tl.float32)
        b_z2 = tl.zeros([BD, BD], dtype=tl.float32)
    return b_h0, b_h1, b_h2, b_z0, b_z1, b_z2


@triton.jit
def _store_state(kv, z, b_h0, b_h1, b_h2, b_z0, b_z1, b_z2, o_v, D, DV, STORE_Z, BD: tl.constexpr):
    """Inverse of _load_state; z only where STORE_Z (one value block writes it)."""
    r1, m1, r2, m2, rz2, mz2 = _state_offsets(D, BD)
    m_v = o_v < DV
    tl.store(kv + o_v, b_h0, mask=m_v)
    tl.store(kv + r1[None, :] * DV + o_v[:, None], b_h1, mask=m1[None, :] & m_v[:, None])
    tl.store(kv + r2[:, None] * DV + o_v[None, :], b_h2, mask=m2[:, None] & m_v[None, :])
    if STORE_Z:
        tl.store(z, b_z0)
        tl.store(z + r1, b_z1, mask=m1)
        tl.store(z + rz2, b_z2, mask=mz2)


@triton.jit
def _load_features(x, o_t, m_t, D, s_t, s_d, scale1, scale2, BD: tl.constexpr):
    """Raw rows x [BT, BD] (zero outside) -> x1 = x / d^(1/4), x2 = x / (2d)^(1/4)."""
    o_d = tl.arange(0, BD)
    b_x = tl.load(x + o_t[:, None] * s_t + o_d[None, :] * s_d, mask=m_t[:, None] & (o_d[None, :] < D), other=0.0)
    b_x = b_x.to(tl.float32)
    return b_x * scale1, b_x * scale2


@triton.jit
def _square(b_x2, BT: tl.constexpr, BD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Second-order features [BT, BD*BD]: row t = vec(x2_t x2_t^T), in the dot operands' dtype (halves registers)."""
    if DOT_PRECISION != "ieee":
        b_x2 = b_x2.to(tl.bfloat16)
    return tl.reshape(b_x2[:, :, None] * b_x2[:, None, :], [BT, BD * BD])


@triton.jit
def _update_state(b_h0, b_h1, b_h2, b_z0, b_z1, b_z2, b_x1, b_x2, b_x2f, b_y, b_c, DOT_PRECISION: tl.constexpr):
    """Fold a chunk (features x1 [BT, BD], x2 [BT, BD], x2f [BT, BD*BD], values y [BT, BV], weights c [BT]) in."""
    b_h0 += tl.sum(b_y, 0)
    b_h1 = _dot(tl.trans(b_y), b_x1, b_h1, DOT_PRECISION)
    b_h2 = _dot(tl.trans(b_x2f), b_y, b_h2, DOT_PRECISION)
    b_z0 += tl.sum(b_c, 0)
    b_z1 += tl.sum(b_x1 * b_c[:, None], 0)
    b_z2 = _dot(tl.trans(b_x2), b_x2 * b_c[:, None], b_z2, DOT_PRECISION)
    return b_h0, b_h1, b_h2, b_z0, b_z1, b_z2


@triton.jit
def _value_readout(b_h0, b_h1, b_h2, b_x1, b_x2f, DOT_PRECISION: tl.constexpr):
    """phi(x) @ kv: [BT, BV]."""
    return _dot(b_x2f, b_h2, _dot(b_x1, tl.trans(b_h1), None, DOT_PRECISION) + b_h0[None, :], DOT_PRECISION)


@triton.jit
def _grad_readout(b_h1, b_h2, b_z1, b_z2, b_x1, b_y, b_c, BT: tl.constexpr, BD: tl.constexpr,
    DOT_PRECISION: tl.constexpr):
    """d/dx of phi(x_t).(kv y_t + z c_t) in units of d^(-1/4): u1 + sqrt(2) U2 x1_t, where u = kv y_t + z c_t and U2
    is its second-order block as [BD, BD] (symmetric). -> [BT, BD]."""
    b_u1 = _dot(b_y, b_h1, None, DOT_PRECISION) + b_c[:, None] * b_z1[None, :]
    # [BD, BD, BT] U2^T = h2 @ y^T: h2 as the A operand, as it is; reading it transposed as well as plain in one kernel
    # (dv and dk) made Triton 3.6 fault on an H200
    b_u2 = tl.reshape(_dot(b_h2, tl.trans(b_y), None, DOT_PRECISION), [BD, BD, BT])
    b_w2 = tl.trans(tl.sum(b_u2 * tl.trans(b_x1)[None, :, :], 1)) + b_c[:, None] * _dot(b_x1, b_z2, None, DOT_PRECISION)
    return b_u1 + SQRT2 * b_w2


# --- chunked forward ------------------------------------------------------------------------------------------------


@triton.jit
def taylor_state_kernel(
    x, y, w, c, kv, z,
    s_xb, s_xt, s_xh, s_xd, s_yb, s_yt, s_yh, s_yv, s_wb, s_wt, s_wh,
    T, H, D, DV, SEG, scale1, scale2,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    WEIGHTED: tl.constexpr, REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Moments of one segment, sum_t phi(x_t) (w_t y_t)^T and sum_t phi(x_t) c_t, into slot p + 1 of kv, z, where p is
    the segment's position in scan order (the last segment in that order is never needed)."""
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NS = tl.num_programs(1) + 1
    # segment i_s at scan position p
    if REVERSE:
        i_s = i_n + 1
        p = NS - 1 - i_s
    else:
        i_s = i_n
        p = i_s
    F = 1 + D + D * D
    o_v = i_v * BV + tl.arange(0, BV)
    x += i_b * s_xb + i_h * s_xh
    y += i_b * s_yb + i_h * s_yh
    w += i_b * s_wb + i_h * s_wh
    c += i_b * s_wb + i_h * s_wh

    b_h0, b_h1, b_h2, b_z0, b_z1, b_z2 = _load_state(kv, z, o_v, D, DV, BD, BV, False)
    for t0 in range(i_s * SEG, tl.minimum(i_s * SEG + SEG, T), BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < T
        b_x1, b_x2 = _load_features(x, o_t, m_t, D, s_xt, s_xd, scale1, scale2, BD)
        b_y, b_c = _load_values(y, w, c, o_t, m_t, o_v, DV, s_yt, s_yv, s_wt, WEIGHTED)
        b_h0, b_h1, b_h2, b_z0, b_z1, b_z2 = _update_state(
            b_h0, b_h1, b_h2, b_z0, b_z1, b_z2, b_x1, b_x2, _square(b_x2, BT, BD, DOT_PRECISION), b_y, b_c,
            DOT_PRECISION
        )
    slot = i_bh * NS + p + 1
    _store_state(kv + slot * F * DV, z + slot * F, b_h0, b_h1, b_h2, b_z0, b_z1, b_z2, o_v, D, DV, i_v == 0, BD)


@triton.jit
def taylor_fwd_kernel(
    q, k, v, m, kv0, z0, o, den, kvT, zT,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vv, s_mb, s_mt, s_mh,
    T, H, D, DV, SEG, eps, scale1, scale2,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """o (and den) of one segment's chunks, scanning from the segment's starting state kv0[slot], z0[slot]."""
    i_v, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NS = tl.num_programs(1)
    F = 1 + D + D * D
    o_i = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    q, k, v, m = _head_inputs(q, k, v, m, i_b, i_h, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_mb, s_mh)
    o += i_b * T * H * DV + i_h * DV
    den += i_b * T * H + i_h
    # [BT, BT] query i sees key j <= i
    causal = o_i[:, None] >= o_i[None, :]

    slot = i_bh * NS + i_s
    b_h0, b_h1, b_h2, b_z0, b_z1, b_z2 = _load_state(kv0 + slot * F * DV, z0 + slot * F, o_v, D, DV, BD, BV,
        HAS_INITIAL_STATE)
    for t0 in range(i_s * SEG, tl.minimum(i_s * SEG + SEG, T), BT):
        o_t = t0 + o_i
        m_t = o_t < T
        b_q1, b_q2 = _load_features(q, o_t, m_t, D, s_qt, s_qd, scale1, scale2, BD)
        b_k1, b_k2 = _load_features(k, o_t, m_t, D, s_kt, s_kd, scale1, scale2, BD)
        # [BT, BV], [BT] masked values and key weights
        b_y, b_c = _load_values(v, m, m, o_t, m_t, o_v, DV, s_vt, s_vv, s_mt, HAS_MASK)
        b_s = _dot(b_q1, tl.trans(b_k1), None, DOT_PRECISION)
        b_p = tl.where(causal, 1 + b_s + 0.5 * b_s * b_s, 0.0)
        b_q2f = _square(b_q2, BT, BD, DOT_PRECISION)
        b_num = _dot(b_p, b_y, _value_readout(b_h0, b_h1, b_h2, b_q1, b_q2f, DOT_PRECISION), DOT_PRECISION)
        b_den = b_z0 + tl.sum(b_q1 * b_z1[None, :], 1) + tl.sum(_dot(b_q2, b_z2, None, DOT_PRECISION) * b_q2, 1)
        b_den += tl.sum(b_p * b_c[None, :], 1)
        b_o = b_num / (b_den + eps)[:, None]
        m_tv = m_t[:, None] & (o_v < DV)[None, :]
        tl.store(o + o_t[:, None] * H * DV + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)
        if i_v == 0:
            tl.store(den + o_t * H, b_den, mask=m_t)
        b_h0, b_h1, b_h2, b_z0, b_z1, b_z2 = _update_state(
            b_h0, b_h1, b_h2, b_z0, b_z1, b_z2, b_k1, b_k2, _square(b_k2, BT, BD, DOT_PRECISION), b_y, b_c,
            DOT_PRECISION
        )
    if STORE_FINAL_STATE:
        if i_s == NS - 1:
            _store_state(
                kvT + i_bh * F * DV, zT + i_bh * F, b_h0, b_h1, b_h2, b_z0, b_z1, b_z2, o_v, D, DV, i_v == 0, BD
            )


# --- chunked backward -----------------------------------------------------------------------------------------------


@triton.jit
def taylor_bwd_dq_kernel(
    q, k, v, m, do, rd, gd, kv0, z0, dq,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vv, s_mb, s_mt, s_mh,
    s_db, s_dt, s_dh, s_dv,
    B, T, H, D, DV, SEG, scale1, scale2,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq of one segment's chunks (value block i_v's share), scanning the forward's states from kv0[slot]."""
    i_v, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NS = tl.num_programs(1)
    F = 1 + D + D * D
    o_i = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_v = i_v * BV + tl.arange(0, BV)
    q, k, v, m = _head_inputs(q, k, v, m, i_b, i_h, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_mb, s_mh)
    do, rd, gd = _head_output_grads(do, rd, gd, i_b, i_h, s_db, s_dh, T, H)
    dq += ((i_v * B + i_b) * T * H + i_h) * D
    causal = o_i[:, None] >= o_i[None, :]
    # the normaliser's share (gd) goes to value block 0 only
    c_share = (i_v == 0).to(tl.float32)

    slot = i_bh * NS + i_s
    b_h0, b_h1, b_h2, b_z0, b_z1, b_z2 = _load_state(kv0 + slot * F * DV, z0 + slot * F, o_v, D, DV, BD, BV,
        HAS_INITIAL_STATE)
    for t0 in range(i_s * SEG, tl.minimum(i_s * SEG + SEG, T), BT):
        o_t = t0 + o_i
        m_t = o_t < T
        b_q1, b_q2 = _load_features(q, o_t, m_t, D, s_qt, s_qd, scale1, scale2, BD)
        b_k1, b_k2 = _load_features(k, o_t, m_t, D, s_kt, s_kd, scale1, scale2, BD)
        b_y, b_c = _load_values(v, m, m, o_t, m_t, o_v, DV, s_vt, s_vv, s_mt, HAS_MASK)
        # [BT, BV] dL/dnum, [BT] dL/dden
        b_g, b_gd = _load_values(do, rd, gd, o_t, m_t, o_v, DV, s_dt, s_dv, H, True)
        b_gd *= c_share
        b_s = _dot(b_q1, tl.trans(b_k1), None, DOT_PRECISION)
        # [BT, BT] dL/dK_tj (1 + s_tj)
        b_ds = _dot(b_g, tl.trans(b_y), None, DOT_PRECISION) + b_gd[:, None] * b_c[None, :]
        b_ds = tl.where(causal, b_ds * (1 + b_s), 0.0)
        b_dq = _dot(b_ds, b_k1, _grad_readout(b_h1, b_h2, b_z1, b_z2, b_q1, b_g, b_gd, BT, BD, DOT_PRECISION),
            DOT_PRECISION)
        tl.store(dq + o_t[:, None] * H * D + o_d[None, :], (b_dq * scale1).to(dq.dtype.element_ty),
                 mask=m_t[:, None] & (o_d < D)[None, :])
        b_h0, b_h1, b_h2, b_z0, b_z1, b_z2 = _update_state(
            b_h0, b_h1, b_h2, b_z0, b_z1, b_z2, b_k1, b_k2, _square(b_k2, BT, BD, DOT_PRECISION), b_y, b_c,
            DOT_PRECISION
        )


@triton.jit
def taylor_bwd_dkv_kernel(
    q, k, v, m, do, rd, gd, kv0, z0, dk, dv, dkv, dz,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vv, s_mb, s_mt, s_mh,
    s_db, s_dt, s_dh, s_dv,
    B, T, H, D, DV, SEG, scale1, scale2,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk (value block i_v's share) and dv of one segment's chunks, scanning backwards in time from the moments of the
    later queries kv0[slot] = sum_t phi(q_t) g_t^T, z0[slot] = sum_t phi(q_t) gd_t; segment 0 writes the initial
    state's gradient."""
    i_v, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NS = tl.num_programs(1)
    F = 1 + D + D * D
    o_i = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_v = i_v * BV + tl.arange(0, BV)
    q, k, v, m = _head_inputs(q, k, v, m, i_b, i_h, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_mb, s_mh)
    do, rd, gd = _head_output_grads(do, rd, gd, i_b, i_h, s_db, s_dh, T, H)
    dk += ((i_v * B + i_b) * T * H + i_h) * D
    dv += i_b * T * H * DV + i_h * DV
    # [BT, BT] key j (row) is seen by query t >= j (column)
    causal = o_i[:, None] <= o_i[None, :]
    c_share = (i_v == 0).to(tl.float32)

    slot = i_bh * NS + NS - 1 - i_s
    b_h0, b_h1, b_h2, b_z0, b_z1, b_z2 = _load_state(kv0 + slot * F * DV, z0 + slot * F, o_v, D, DV, BD, BV,
        HAS_INITIAL_STATE)
    t_lo = i_s * SEG
    n = tl.cdiv(tl.minimum(t_lo + SEG, T) - t_lo, BT)
    for i in range(n):
        o_t = t_lo + (n - 1 - i) * BT + o_i
        m_t = o_t < T
        b_q1, b_q2 = _load_features(q, o_t, m_t, D, s_qt, s_qd, scale1, scale2, BD)
        b_k1, b_k2 = _load_features(k, o_t, m_t, D, s_kt, s_kd, scale1, scale2, BD)
        b_y, b_c = _load_values(v, m, m, o_t, m_t, o_v, DV, s_vt, s_vv, s_mt, HAS_MASK)
        b_g, b_gd = _load_values(do, rd, gd, o_t, m_t, o_v, DV, s_dt, s_dv, H, True)
        # [BT, BT] s_jt
        b_s = _dot(b_k1, tl.trans(b_q1), None, DOT_PRECISION)
        b_p = tl.where(causal, 1 + b_s + 0.5 * b_s * b_s, 0.0)
        b_k2f = _square(b_k2, BT, BD, DOT_PRECISION)
        b_dv = _dot(b_p, b_g, _value_readout(b_h0, b_h1, b_h2, b_k1, b_k2f, DOT_PRECISION), DOT_PRECISION)
        b_dv *= b_c[:, None]
        m_tv = m_t[:, None] & (o_v < DV)[None, :]
        tl.store(dv + o_t[:, None] * H * DV + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        b_ck = b_c * c_share
        b_ds = _dot(b_y, tl.trans(b_g), None, DOT_PRECISION) + b_ck[:, None] * b_gd[None, :]
        b_ds = tl.where(causal, b_ds * (1 + b_s), 0.0)
        b_dk = _dot(b_ds, b_q1, _grad_readout(b_h1, b_h2, b_z1, b_z2, b_k1, b_y, b_ck, BT, BD, DOT_PRECISION),
            DOT_PRECISION)
        tl.store(dk + o_t[:, None] * H * D + o_d[None, :], (b_dk * scale1).to(dk.dtype.element_ty),
                 mask=m_t[:, None] & (o_d < D)[None, :])
        b_h0, b_h1, b_h2, b_z0, b_z1, b_z2 = _update_state(
            b_h0, b_h1, b_h2, b_z0, b_z1, b_z2, b_q1, b_q2, _square(b_q2, BT, BD, DOT_PRECISION), b_g, b_gd,
            DOT_PRECISION
        )
    if STORE_FINAL_STATE:
        if i_s == 0:
            _store_state(
                dkv + i_bh * F * DV, dz + i_bh * F, b_h0, b_h1, b_h2, b_z0, b_z1, b_z2, o_v, D, DV, i_v == 0, BD
            )


# --- decode ---------------------------------------------------------------------------------------------------------


@triton.jit
def taylor_recurrent_fwd_kernel(
    q, k, v, m, kv0, z0, o, kvT, zT,
    s_qb, s_qh, s_qd, s_kb, s_kh, s_kd, s_vb, s_vh, s_vv, s_mb,
    H, D, DV, eps, scale1, scale2,
    BD: tl.constexpr, BV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
):
    """One token: fold key k (inclusive) into the state, read it out with q; fp32 elementwise, no matrix units."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    F = 1 + D + D * D
    o_d = tl.arange(0, BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_d = o_d < D
    b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_d * s_qd, mask=m_d, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_b * s_kb + i_h * s_kh + o_d * s_kd, mask=m_d, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_b * s_vb + i_h * s_vh + o_v * s_vv, mask=o_v < DV, other=0.0).to(tl.float32)
    b_c = 1.0
    if HAS_MASK:
        b_c = tl.load(m + i_b * s_mb).to(tl.float32)
    b_y = b_v * b_c
    b_q1, b_q2, b_k1, b_k2 = b_q * scale1, b_q * scale2, b_k * scale1, b_k * scale2
    # [BD*BD] second-order features
    b_q2f = tl.reshape(b_q2[:, None] * b_q2[None, :], [BD * BD])
    b_k2f = tl.reshape(b_k2[:, None] * b_k2[None, :], [BD * BD])

    b_h0, b_h1, b_h2, b_z0, b_z1, b_z2 = _load_state(kv0 + i_bh * F * DV, z0 + i_bh * F, o_v, D, DV, BD, BV,
        HAS_INITIAL_STATE)
    b_h0 += b_y
    b_h1 += b_y[:, None] * b_k1[None, :]
    b_h2 += b_k2f[:, None] * b_y[None, :]
    b_z0 += b_c
    b_z1 += b_k1 * b_c
    b_z2 += b_k2[:, None] * b_k2[None, :] * b_c
    b_num = b_h0 + tl.sum(b_h1 * b_q1[None, :], 1) + tl.sum(b_q2f[:, None] * b_h2, 0)
    b_den = b_z0 + tl.sum(b_q1 * b_z1, 0) + tl.sum(tl.sum(b_q2[:, None] * b_z2 * b_q2[None, :], 1), 0)
    tl.store(o + i_bh * DV + o_v, (b_num / (b_den + eps)).to(o.dtype.element_ty), mask=o_v < DV)
    if STORE_FINAL_STATE:
        _store_state(kvT + i_bh * F * DV, zT + i_bh * F, b_h0, b_h1, b_h2, b_z0, b_z1, b_z2, o_v, D, DV, i_v == 0, BD)


# --- launchers ------------------------------------------------------------------------------------------------------


def _blocks(d, value_dim, block_v, chunk):
    """-> BD, BT, BV, warps: the padded feature dim, the chunk, the value block (capped so that h2 fits on chip)."""
    bd = block_size(d)
    bv = block_size(value_dim, min(block_v, STATE_BUDGET // (bd * bd)))
    return bd, chunk or BLOCK_T, bv, NUM_WARPS * bd // 16


def _plan(q, k, v, chunk, segment, block_v):
    """-> (kernel meta-parameters, value blocks NV, segment length SEG, segments NS) of a chunked launch."""
    batch, length, heads, d = q.shape
    bd, bt, bv, warps = _blocks(d, v.shape[-1], block_v, chunk)
    nv = cdiv(v.shape[-1], bv)
    if not segment:
        # enough segments to give every multiprocessor a few programs, none shorter than MIN_SEGMENT
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        ns = max(1, min(cdiv(PROGRAMS_PER_SM * sms, batch * heads * nv), length // MIN_SEGMENT))
        segment = cdiv(cdiv(length, ns), bt) * bt
    # fp32 products for fp32 inputs (bf16 operands lose ~3 digits; fp32 inputs are expected to give ~1e-5)
    meta = dict(BT=bt, BD=bd, BV=bv, DOT_PRECISION=dot_precision(q, k, v), num_warps=warps)
    return meta, nv, segment, cdiv(length, segment)


def _starts(x, y, w, c, start, reverse, meta, nv, seg, ns):
    """Starting state of every segment in scan order (reversed when `reverse`): (kv [B, H, NS, F, Dv],
    z [B, H, NS, F]) fp32, or None when there is one segment and no start state."""
    batch, length, heads, d = x.shape
    value_dim = y.shape[-1]
    if ns == 1:
        return None if start is None else (start[0].contiguous(), start[1].contiguous())
    num_features = taylor_num_features(d)
    kv = x.new_empty(batch, heads, ns, num_features, value_dim, dtype=torch.float32)
    z = x.new_empty(batch, heads, ns, num_features, dtype=torch.float32)
    if start is None:
        kv[:, :, 0].zero_()
        z[:, :, 0].zero_()
    else:
        kv[:, :, 0].copy_(start[0])
        z[:, :, 0].copy_(start[1])
    w, s_w = _token_weights(w, x)
    taylor_state_kernel[(nv, ns - 1, batch * heads)](
        x, y, w, x if c is None else c, kv, z, *x.stride(), *y.stride(), *s_w,
        length, heads, d, value_dim, seg, d**-0.25, (2 * d) ** -0.25,
        WEIGHTED=c is not None, REVERSE=reverse, num_stages=NUM_STAGES, **meta,
    )
    kv.cumsum_(2)
    z.cumsum_(2)
    return kv, z


def _taylor_fwd(q, k, v, mask, start, output_final_state, eps, chunk, segment, block_v):
    batch, length, heads, d = q.shape
    value_dim = v.shape[-1]
    num_features = taylor_num_features(d)
    meta, nv, seg, ns = _plan(q, k, v, chunk, segment, block_v)
    starts = _starts(k, v, mask, mask, start, False, meta, nv, seg, ns)
    o = v.new_empty(batch, length, heads, value_dim)
    den = q.new_empty(batch, length, heads, dtype=torch.float32)
    final = None
    if output_final_state:
        final = (q.new_empty(batch, heads, num_features, value_dim, dtype=torch.float32),
                 q.new_empty(batch, heads, num_features, dtype=torch.float32))
    m, s_m = _token_weights(mask, q)
    taylor_fwd_kernel[(nv, ns, batch * heads)](
        q, k, v, m, *_state_args(starts, q), o, den, *(final or (q, q)),
        *q.stride(), *k.stride(), *v.stride(), *s_m,
        length, heads, d, value_dim, seg, eps, d**-0.25, (2 * d) ** -0.25,
        HAS_MASK=mask is not None, HAS_INITIAL_STATE=starts is not None, STORE_FINAL_STATE=output_final_state,
        num_stages=NUM_STAGES, **meta,
    )
    return o, den, final


def _taylor_bwd(q, k, v, mask, start, o, den, do, dfinal, need_dstart, eps, chunk, segment, block_v):
    batch, length, heads, d = q.shape
    value_dim = v.shape[-1]
    num_features = taylor_num_features(d)
    meta, nv, seg, ns = _plan(q, k, v, chunk, segment, block_v)
    rd, gd = normaliser_grads(o, do, den, eps)
    fwd_starts = _starts(k, v, mask, mask, start and _symmetric(start, d), False, meta, nv, seg, ns)
    rev_starts = _starts(q, do, rd, gd, dfinal and _symmetric(dfinal, d), True, meta, nv, seg, ns)
    # with several value blocks, dq and dk are fp32 partial sums [NV, B, T, H, d]
    dq = q.new_empty(batch, length, heads, d) if nv == 1 else q.new_empty(nv, *q.shape, dtype=torch.float32)
    dk = k.new_empty(batch, length, heads, d) if nv == 1 else k.new_empty(nv, *k.shape, dtype=torch.float32)
    dv = v.new_empty(batch, length, heads, value_dim)
    dstart = None
    if need_dstart:
        dstart = (q.new_empty(batch, heads, num_features, value_dim, dtype=torch.float32),
                  q.new_empty(batch, heads, num_features, dtype=torch.float32))
    m, s_m = _token_weights(mask, q)
    args = (
        *q.stride(), *k.stride(), *v.stride(), *s_m, *do.stride(),
        batch, length, heads, d, value_dim, seg, d**-0.25, (2 * d) ** -0.25,
    )
    meta.update(HAS_MASK=mask is not None, num_stages=NUM_STAGES_BWD)
    taylor_bwd_dq_kernel[(nv, ns, batch * heads)](
        q, k, v, m, do, rd, gd, *_state_args(fwd_starts, q), dq, *args, HAS_INITIAL_STATE=fwd_starts is not None, **meta
    )
    taylor_bwd_dkv_kernel[(nv, ns, batch * heads)](
        q, k, v, m, do, rd, gd, *_state_args(rev_starts, q), dk, dv, *(dstart or (q, q)), *args,
        HAS_INITIAL_STATE=rev_starts is not None, STORE_FINAL_STATE=need_dstart, **meta,
    )
    if nv > 1:
        dq, dk = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype)
    if need_dstart and dfinal is not None:
        # the final state passes its gradient on unchanged, the part the symmetrised readouts dropped included
        dstart = tuple(a + b - c for a, b, c in zip(dstart, dfinal, _symmetric(dfinal, d)))
    return dq, dk, dv, dstart


def _use_reference(q, k, v):
    """fp64 inputs (the kernels accumulate in fp32), d > MAX_DIM and malformed inputs (for its errors) go to the
    reference."""
    tensors = all(isinstance(x, torch.Tensor) for x in (q, k, v))
    return not tensors or q.dim() != 4 or q.shape[-1] > MAX_DIM or accumulation_dtype(q, k, v) != torch.float32


def _check(q, k, v, key_mask, initial_state):
    """The reference's checks, in its order and words (it checks k again once feature-mapped: a shape-only stand-in
    reproduces that message). -> (kv0, z0) in fp32, or None."""
    batch, length, heads, d = check_shape("q", q, "batch, time, heads, dim")
    check_shape("k", k, "batch, time, heads, dim", (None, None, None, d))
    num_features = taylor_num_features(d)
    k_features = torch.empty(*k.shape[:3], num_features, device="meta")
    check_shape("k", k_features, "batch, time, heads, features", (batch, length, heads, num_features))
    value_dim = check_shape("v", v, "batch, time, heads, value_dim", (batch, length, heads, None))[-1]
    if key_mask is not None:
        check_shape("key_mask", key_mask, "batch, time", (batch, length))
    if initial_state is None:
        return None
    return prepare_state(initial_state, batch, heads, num_features, value_dim, torch.float32, q.device)


def _chunked(q, k, v, key_mask, start, output_final_state, eps, chunk=None, segment=None, block_v=None,
             block_v_bwd=None, algorithm=None):
    mask = None if key_mask is None else key_mask.to(torch.float32)[:, :, None].expand(-1, -1, q.shape[2])
    kv0, z0 = start or (None, None)
    algorithm = algorithm or ALGORITHM
    if algorithm == "two_pass":
        ops, blocks = (_two_pass_fwd, _two_pass_bwd), (chunk, segment, block_v)
        blocks_bwd = blocks
    elif algorithm == "scan":
        ops, blocks = (_taylor_fwd, _taylor_bwd), (chunk, segment, block_v or BLOCK_V)
        blocks_bwd = (chunk, segment, block_v_bwd or BLOCK_V_BWD)
    else:
        raise ValueError(f"algorithm={algorithm!r}: expected one of {ALGORITHMS}")
    out = ChunkedTaylorFunction.apply(*ops, q, k, v, mask, kv0, z0, output_final_state, eps, blocks, blocks_bwd)
    return (out[0], out[1:]) if output_final_state else (out, None)


def _taylor_linear_attention(q, k, v, key_mask=None, initial_state=None, output_final_state=False, eps=1e-12,
                             **blocks):
    """taylor_linear_attention with block sizes: chunk, segment (tokens, a multiple of chunk), block_v, block_v_bwd;
    and the algorithm (ALGORITHMS)."""
    if _use_reference(q, k, v):
        return taylor_linear_attention_reference(q, k, v, key_mask, initial_state, output_final_state, eps)
    start = _check(q, k, v, key_mask, initial_state)
    return _chunked(q, k, v, key_mask, start, output_final_state, eps, **blocks)


def taylor_linear_attention(q, k, v, key_mask=None, initial_state=None, output_final_state=False, eps=1e-12):
    """BASED linear attention on raw q, k [B, T, H, d] (d <= 32), v [B, T, H, Dv]: see the module docstring."""
    return _taylor_linear_attention(q, k, v, key_mask, initial_state, output_final_state, eps)


def _taylor_decode(q, k, v, key_mask, start, output_final_state, eps):
    batch, _, heads, d = q.shape
    value_dim = v.shape[-1]
    num_features = taylor_num_features(d)
    bd, _, bv, _ = _blocks(d, value_dim, BLOCK_V_DECODE, None)
    o = v.new_empty(batch, 1, heads, value_dim)
    final = None
    if output_final_state:
        final = (q.new_empty(batch, heads, num_features, value_dim, dtype=torch.float32),
                 q.new_empty(batch, heads, num_features, dtype=torch.float32))
    m = q if key_mask is None else key_mask.to(torch.float32)
    start = start and (start[0].contiguous(), start[1].contiguous())
    taylor_recurrent_fwd_kernel[(cdiv(value_dim, bv), batch * heads)](
        q, k, v, m, *_state_args(start, q), o, *(final or (q, q)),
        q.stride(0), q.stride(2), q.stride(3), k.stride(0), k.stride(2), k.stride(3),
        v.stride(0), v.stride(2), v.stride(3), m.stride(0),
        heads, d, value_dim, eps, d**-0.25, (2 * d) ** -0.25,
        BD=bd, BV=bv, HAS_MASK=key_mask is not None, HAS_INITIAL_STATE=start is not None,
        STORE_FINAL_STATE=output_final_state,
    )
    return o, final


def taylor_linear_attention_recurrent(q, k, v, key_mask=None, initial_state=None, output_final_state=False, eps=1e-12):
    """Decode form of taylor_linear_attention: T = 1 without gradients runs the decode kernel, else the chunked op."""
    if _use_reference(q, k, v):
        return taylor_linear_attention_recurrent_reference(q, k, v, key_mask, initial_state, output_final_state, eps)
    start = _check(q, k, v, key_mask, initial_state)
    if not use_decode_kernel(q, k, v, *(start or ())):
        return _chunked(q, k, v, key_mask, start, output_final_state, eps)
    return _taylor_decode(q, k, v, key_mask, start, output_final_state, eps)
