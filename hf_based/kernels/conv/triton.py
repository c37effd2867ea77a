"""Triton kernels for `short_conv`, the depthwise causal short convolution (kernel size K, typically <= 4).

Time-major [B, T, C] with the state (the K-1 inputs before x) read in place of the left padding, so no padded copy of
x is made. One program per (channel block, time block, batch) in the forward; the backward's programs each cover a
run of time blocks, writing dx and their partial sums of dweight and dbias (summed over programs afterwards, so the
result is deterministic). At T = 1 the forward kernel is the fused decode step: one launch that reads the state once
and writes y and the next state.
"""

import torch
import triton
import triton.language as tl

from hf_based.kernels._checks import accumulation_dtype, check_shape
from hf_based.kernels.triton_utils import block_size, cdiv, unit_last_dim

# time steps x channels per block; wide channel blocks keep the backward's sums over time inside each thread
BLOCK_T, BLOCK_C = 16, 512
BWD_BLOCK_T, BWD_BLOCK_C = 8, 1024
BWD_PROGRAMS = 2048  # the backward splits time until about this many programs run (the partial sums grow with it)


@triton.jit
def _short_conv_xs(x, s0, o_s, o_c, m_c, s_xt, T, C, K: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr):
    """[R, BC] fp32: the conv's input at times o_s [R]; times -(K-1) <= s < 0 are the state's rows s + K-1."""
    b_x = tl.load(x + o_s[:, None] * s_xt + o_c[None, :], mask=((o_s >= 0) & (o_s < T))[:, None] & m_c, other=0)
    b_x = b_x.to(tl.float32)
    if HAS_INITIAL_STATE:
        m_s = ((o_s < 0) & (o_s >= 1 - K))[:, None] & m_c
        b_x += tl.load(s0 + (o_s + K - 1)[:, None] * C + o_c[None, :], mask=m_s, other=0).to(tl.float32)
    return b_x


@triton.jit
def _short_conv_dxs(dy, dst, w, o_s, o_c, m_c, s_dt, s_wc, s_wk, T, C, K: tl.constexpr,
    HAS_FINAL_STATE_GRAD: tl.constexpr):
    """[R, BC] fp32: the gradient of the conv's input at times o_s [R] (negative: the state's rows)."""
    b_dx = tl.zeros([o_s.shape[0], o_c.shape[0]], dtype=tl.float32)
    for i in tl.static_range(K):
        o_t = o_s + K - 1 - i  # the output that tap i of input s feeds
        b_w = tl.load(w + o_c * s_wc + i * s_wk, mask=m_c, other=0).to(tl.float32)
        b_dy = tl.load(dy + o_t[:, None] * s_dt + o_c[None, :], mask=((o_t >= 0) & (o_t < T))[:, None] & m_c, other=0)
        b_dx += b_w[None, :] * b_dy.to(tl.float32)
    if HAS_FINAL_STATE_GRAD:  # the final state is the inputs at times T-(K-1) .. T-1
        o_j = o_s - T + K - 1
        m_j = ((o_j >= 0) & (o_j < K - 1))[:, None] & m_c
        b_dx += tl.load(dst + o_j[:, None] * C + o_c[None, :], mask=m_j, other=0).to(tl.float32)
    return b_dx


@triton.jit
def short_conv_fwd_kernel(
    x, w, b, s0, y, st,
    s_xb, s_xt, s_yb, s_yt, s_wc, s_wk,
    T, C,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
):
    i_c, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_t = i_t * BT + tl.arange(0, BT)
    x += i_b * s_xb
    if HAS_INITIAL_STATE:
        s0 += i_b * (K - 1) * C

    # [BT, BC]
    b_y = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(K):
        b_w = tl.load(w + o_c * s_wc + i * s_wk, mask=m_c, other=0).to(tl.float32)
        b_y += b_w[None, :] * _short_conv_xs(x, s0, o_t + i - (K - 1), o_c, m_c, s_xt, T, C, K, HAS_INITIAL_STATE)
    if HAS_BIAS:
        b_y += tl.load(b + o_c, mask=m_c, other=0).to(tl.float32)[None, :]
    p_y = y + i_b * s_yb + o_t[:, None] * s_yt + o_c[None, :]
    tl.store(p_y, b_y.to(y.dtype.element_ty), mask=(o_t < T)[:, None] & m_c)
    if STORE_FINAL_STATE:
        if i_t == tl.num_programs(1) - 1:
            # [BS, BC]: the last K-1 inputs, reaching into the state when T < K-1
            o_j = tl.arange(0, BS)
            b_s = _short_conv_xs(x, s0, T - (K - 1) + o_j, o_c, m_c, s_xt, T, C, K, HAS_INITIAL_STATE)
            p_s = st + i_b * (K - 1) * C + o_j[:, None] * C + o_c[None, :]
            tl.store(p_s, b_s.to(st.dtype.element_ty), mask=(o_j < K - 1)[:, None] & m_c)


@triton.jit
def short_conv_bwd_kernel(
    x, w, s0, dy, dst, dx, ds0, dwb,
    s_xb, s_xt, s_db, s_dt, s_gb, s_gt, s_wc, s_wk,
    T, C, NB,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, BW: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr, HAS_FINAL_STATE_GRAD: tl.constexpr, STORE_INITIAL_STATE_GRAD: tl.constexpr,
):
    """dx over NB time blocks, and their partial dweight (rows < K) and dbias (row K) into dwb [B, NS, K+1, C]."""
    i_c, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    x += i_b * s_xb
    dy += i_b * s_db
    if HAS_INITIAL_STATE:
        s0 += i_b * (K - 1) * C
    if HAS_FINAL_STATE_GRAD:
        dst += i_b * (K - 1) * C
    o_w = tl.arange(0, BW)

    # [BW, BC]
    b_dw = tl.zeros([BW, BC], dtype=tl.float32)
    for i_n in range(NB):
        o_t = (i_s * NB + i_n) * BT + tl.arange(0, BT)
        m_t = (o_t < T)[:, None] & m_c
        b_dx = _short_conv_dxs(dy, dst, w, o_t, o_c, m_c, s_dt, s_wc, s_wk, T, C, K, HAS_FINAL_STATE_GRAD)
        tl.store(dx + i_b * s_gb + o_t[:, None] * s_gt + o_c[None, :], b_dx.to(dx.dtype.element_ty), mask=m_t)
        # [BT, BC]
        b_dy = tl.load(dy + o_t[:, None] * s_dt + o_c[None, :], mask=m_t, other=0).to(tl.float32)
        for i in tl.static_range(K):
            b_x = _short_conv_xs(x, s0, o_t + i - (K - 1), o_c, m_c, s_xt, T, C, K, HAS_INITIAL_STATE)
            b_dw += tl.where(o_w[:, None] == i, tl.sum(b_dy * b_x, 0)[None, :], 0)
        b_dw += tl.where(o_w[:, None] == K, tl.sum(b_dy, 0)[None, :], 0)
    p_dw = dwb + ((i_b * tl.num_programs(1) + i_s) * (K + 1) + o_w[:, None]) * C + o_c[None, :]
    tl.store(p_dw, b_dw, mask=(o_w < K + 1)[:, None] & m_c)
    if STORE_INITIAL_STATE_GRAD:
        if i_s == 0:
            o_j = tl.arange(0, BS)
            b_ds = _short_conv_dxs(dy, dst, w, o_j - (K - 1), o_c, m_c, s_dt, s_wc, s_wk, T, C, K, HAS_FINAL_STATE_GRAD)
            p_ds = ds0 + i_b * (K - 1) * C + o_j[:, None] * C + o_c[None, :]
            tl.store(p_ds, b_ds.to(ds0.dtype.element_ty), mask=(o_j < K - 1)[:, None] & m_c)


def _blocks(T, C, K, block_t, block_c):
    """-> BT, BC, BS (the state's rows, padded to a power of 2); no tl.dot, so no floor of 16."""
    return block_size(T, block_t, minimum=1), block_size(C, block_c, minimum=1), block_size(K - 1, minimum=1)


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, output_final_state, state_dtype):
        B, T, C = x.shape
        K = weight.shape[1]
        BT, BC, BS = _blocks(T, C, K, BLOCK_T, BLOCK_C)
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        final = x.new_empty(B, K - 1, C, dtype=state_dtype) if output_final_state else None
        short_conv_fwd_kernel[(cdiv(C, BC), cdiv(T, BT), B)](
            x, weight, bias, initial_state, y, final,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), weight.stride(0), weight.stride(1),
            T, C,
            K=K, BT=BT, BC=BC, BS=BS,
            HAS_BIAS=bias is not None, HAS_INITIAL_STATE=initial_state is not None,
            STORE_FINAL_STATE=output_final_state,
        )
        ctx.save_for_backward(x, weight, bias, initial_state)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, weight, bias, initial_state = ctx.saved_tensors
        B, T, C = x.shape
        K = weight.shape[1]
        BT, BC, BS = _blocks(T, C, K, BWD_BLOCK_T, BWD_BLOCK_C)
        NT, NC = cdiv(T, BT), cdiv(C, BC)
        NB = cdiv(NT, min(NT, max(1, BWD_PROGRAMS // (B * NC))))
        NS = cdiv(NT, NB)
        dy = unit_last_dim(dy)
        dfinal = None if dfinal is None else dfinal.contiguous()
        want_ds0 = initial_state is not None and ctx.needs_input_grad[3]
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ds0 = torch.empty_like(initial_state) if want_ds0 else None
        dwb = x.new_empty(B, NS, K + 1, C, dtype=torch.float32)
        short_conv_bwd_kernel[(NC, NS, B)](
            x, weight, initial_state, dy, dfinal, dx, ds0, dwb,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
            weight.stride(0), weight.stride(1),
            T, C, NB,
            K=K, BT=BT, BC=BC, BS=BS, BW=block_size(K + 1, minimum=1),
            HAS_INITIAL_STATE=initial_state is not None, HAS_FINAL_STATE_GRAD=dfinal is not None,
            STORE_INITIAL_STATE_GRAD=want_ds0,
        )
        dwb = dwb.sum((0, 1))  # [K+1, C]
        dw = dwb[:K].t().to(weight.dtype)
        db = None if bias is None else dwb[K].to(bias.dtype)
        return dx, dw, db, ds0, None, None


def short_conv(x, weight, bias=None, initial_state=None, output_final_state=False):
    """Same arguments and result as the reference `short_conv`: y [B, T, C] in x.dtype, final state [B, K-1, C] in
    the accumulation dtype (fp32 for half / bf16 / fp32 inputs) or None."""
    batch, _, channels = check_shape("x", x, "batch, time, channels")
    kernel_size = check_shape("weight", weight, "channels, kernel_size", (channels, None))[1]
    if bias is not None:
        check_shape("bias", bias, "channels", (channels,))
        bias = bias.contiguous()
    if initial_state is not None:
        check_shape(
            "initial_state", initial_state, "batch, kernel_size - 1, channels", (batch, kernel_size - 1, channels)
        )
        initial_state = initial_state.contiguous()
    x = unit_last_dim(x)
    state_dtype = accumulation_dtype(x, weight)
    return ShortConvFunction.apply(x, weight, bias, initial_state, output_final_state, state_dtype)


def short_conv_recurrent(x, weight, bias=None, initial_state=None, output_final_state=False):
    """Decode form; same arguments and result as the reference `short_conv_recurrent`. At T = 1, `short_conv`'s forward
    kernel is the fused step (one launch, the state read and written once, no host sync), so this is `short_conv`."""
    return short_conv(x, weight, bias, initial_state, output_final_state)
