"""What both chunked Taylor algorithms share (triton.py's scan and two_pass.py): the dot with its precision rule, the
value and weight tiles, the backward's per-token normaliser gradients, host helpers for optional weights and states,
and the autograd function around an algorithm's forward and backward."""

import torch
import triton
import triton.language as tl

from hf_based.kernels.feature_maps import taylor_num_features
from hf_based.kernels.triton_utils import cdiv, next_power_of_2


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """a @ b (+ acc) in fp32: exact fp32 products for fp32 inputs ("ieee"), else bf16 operands (fp16 states could
    overflow)."""
    if DOT_PRECISION == "ieee":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    return acc


@triton.jit
def _load_values(y, w, c, o_t, m_t, o_v, DV, s_yt, s_yv, s_wt, WEIGHTED: tl.constexpr):
    """Values w_t y_t [BT, BV] and normaliser weights c_t [BT]; w = c = 1 without weights; 0 outside [0, T)."""
    b_y = tl.load(y + o_t[:, None] * s_yt + o_v[None, :] * s_yv, mask=m_t[:, None] & (o_v[None, :] < DV), other=0.0)
    b_y = b_y.to(tl.float32)
    if WEIGHTED:
        b_w = tl.load(w + o_t * s_wt, mask=m_t, other=0.0).to(tl.float32)
        b_c = tl.load(c + o_t * s_wt, mask=m_t, other=0.0).to(tl.float32)
    else:
        b_w = m_t.to(tl.float32)
        b_c = b_w
    return b_y * b_w[:, None], b_c


@triton.jit
def _head_inputs(q, k, v, m, i_b, i_h, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_mb, s_mh):
    """q, k, v and the key weights m at batch i_b, head i_h."""
    q += i_b * s_qb + i_h * s_qh
    k += i_b * s_kb + i_h * s_kh
    v += i_b * s_vb + i_h * s_vh
    m += i_b * s_mb + i_h * s_mh
    return q, k, v, m


@triton.jit
def _head_output_grads(do, rd, gd, i_b, i_h, s_db, s_dh, T, H):
    """The output's gradient do and the per-token rd, gd ([B, T, H]) at batch i_b, head i_h."""
    return do + i_b * s_db + i_h * s_dh, rd + i_b * T * H + i_h, gd + i_b * T * H + i_h


@triton.jit
def taylor_bwd_preprocess_kernel(
    o, do, den, rd, gd, s_db, s_dt, s_dh, s_dv, T, H, DV, eps, BT: tl.constexpr, BDV: tl.constexpr
):
    """rd = 1 / (den + eps) and gd = -(do . o) rd per token (fp32 [B, T, H])."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    o_v = tl.arange(0, BDV)
    m_t = o_t < T
    m_tv = m_t[:, None] & (o_v < DV)[None, :]
    b_o = tl.load(o + (i_b * T + o_t[:, None]) * H * DV + i_h * DV + o_v[None, :], mask=m_tv, other=0.0)
    b_do = tl.load(do + i_b * s_db + i_h * s_dh + o_t[:, None] * s_dt + o_v[None, :] * s_dv, mask=m_tv, other=0.0)
    p_t = (i_b * T + o_t) * H + i_h
    b_rd = 1 / (tl.load(den + p_t, mask=m_t, other=0.0) + eps)
    tl.store(rd + p_t, b_rd, mask=m_t)
    tl.store(gd + p_t, -tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1) * b_rd, mask=m_t)


def normaliser_grads(o, do, den, eps):
    """rd = 1 / (den + eps) and gd = -(do . o) rd, fp32 [B, T, H], for the backward kernels."""
    batch, length, heads, value_dim = o.shape
    rd = o.new_empty(batch, length, heads, dtype=torch.float32)
    gd = torch.empty_like(rd)
    taylor_bwd_preprocess_kernel[(cdiv(length, 32), batch * heads)](
        o,
        do,
        den,
        rd,
        gd,
        *do.stride(),
        length,
        heads,
        value_dim,
        eps,
        BT=32,
        BDV=max(16, next_power_of_2(value_dim)),
    )
    return rd, gd


def _token_weights(w, like):
    """(tensor, strides) of per-token weights [B, T, H]; `like` and zero strides stand in when there are none."""
    return (like, (0, 0, 0)) if w is None else (w, w.stride())


def _state_args(starts, like):
    """Pointer arguments for optional (kv, z) states: `like` stands in for absent ones."""
    return (like, like) if starts is None else starts


def _symmetric(state, d):
    """(kv, z) with the second-order block averaged with its transpose: what the gradient readouts assume."""

    def sym(x):
        x2 = x[:, :, 1 + d :].unflatten(2, (d, d))
        return torch.cat([x[:, :, : 1 + d], ((x2 + x2.transpose(2, 3)) / 2).flatten(2, 3)], 2)

    return sym(state[0]), sym(state[1])


class ChunkedTaylorFunction(torch.autograd.Function):
    """Autograd around one chunked algorithm: forward_op(q, k, v, mask, start, output_final_state, eps, *blocks) ->
    (o, den, final state or None) and backward_op(q, k, v, mask, start, o, den, do, dfinal, need_dstart, eps,
    *blocks_bwd) -> (dq, dk, dv, dstart or None)."""

    @staticmethod
    def forward(ctx, forward_op, backward_op, q, k, v, mask, kv0, z0, output_final_state, eps, blocks, blocks_bwd):
        start = None if kv0 is None else (kv0, z0)
        o, den, final = forward_op(q, k, v, mask, start, output_final_state, eps, *blocks)
        ctx.save_for_backward(q, k, v, mask, kv0, z0, o, den)
        ctx.backward_op, ctx.config = backward_op, (eps, *blocks_bwd)
        ctx.set_materialize_grads(False)
        return (o, *final) if output_final_state else o

    @staticmethod
    def backward(ctx, do, dkv=None, dz=None):
        q, k, v, mask, kv0, z0, o, den = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        dfinal = None
        if dkv is not None or dz is not None:
            batch, _, heads, d = q.shape
            shape = (batch, heads, taylor_num_features(d))
            dfinal = (
                q.new_zeros(*shape, v.shape[-1], dtype=torch.float32) if dkv is None else dkv,
                q.new_zeros(shape, dtype=torch.float32) if dz is None else dz,
            )
        need_dstart = kv0 is not None and (ctx.needs_input_grad[6] or ctx.needs_input_grad[7])
        start = None if kv0 is None else (kv0, z0)
        dq, dk, dv, dstart = ctx.backward_op(q, k, v, mask, start, o, den, do, dfinal, need_dstart, *ctx.config)
        return None, None, dq, dk, dv, None, *(dstart or (None, None)), None, None, None, None
