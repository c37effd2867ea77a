"""The hedgehog feature map in one kernel: per block of BT tokens and one head, u = x W in fp32, then softmax(u)
and softmax(-u) written side by side in x's dtype. When x and W share a 16-bit dtype the product runs on the tensor
cores: their products are exact in fp32 and accumulate in fp32, as in the reference's fp32 einsum. It replaces the
reference's casts, batched matmul, two softmaxes, concatenation and clamp (about ten launches per map, two maps per
hybrid layer). Forward only: with gradients to
compute, for fp64, and while torch.compile traces (Inductor fuses the reference), the reference runs."""

import torch
import triton
import triton.language as tl

from hf_based.kernels._checks import check_shape
from hf_based.kernels.hedgehog.reference import hedgehog_feature_map as hedgehog_feature_map_reference
from hf_based.kernels.triton_utils import block_size, cdiv, use_forward_kernel

BLOCK_T = 64  # tokens per program
MIN_FEATURE = 1e-12  # LoLCATs' clamp: no feature exactly 0 after softmax underflow


@triton.jit
def hedgehog_fwd_kernel(
    X, W, Y, N, D, F, stride_xn, stride_xh, stride_yn, stride_yh,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, MIN_FEATURE: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    """Rows n = (batch, time) flattened; X [N, H, D], W [H, D, F], Y [N, H, 2F]."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    n = i_t * BT + tl.arange(0, BT)
    d = tl.arange(0, BD)
    f = tl.arange(0, BF)
    x = tl.load(X + n[:, None].to(tl.int64) * stride_xn + i_h * stride_xh + d[None, :],
                mask=(n[:, None] < N) & (d[None, :] < D), other=0.0)
    w = tl.load(W + i_h * D * F + d[:, None] * F + f[None, :], mask=(d[:, None] < D) & (f[None, :] < F), other=0.0)
    if NATIVE_DOT:
        u = tl.dot(x, w, out_dtype=tl.float32)  # [BT, BF]
    else:
        u = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    u = tl.where(f[None, :] < F, u, float("-inf"))
    pos = tl.exp(u - tl.max(u, 1)[:, None])
    pos = pos / tl.sum(pos, 1)[:, None]
    neg_u = tl.where(f[None, :] < F, -u, float("-inf"))
    neg = tl.exp(neg_u - tl.max(neg_u, 1)[:, None])
    neg = neg / tl.sum(neg, 1)[:, None]
    y = Y + n[:, None].to(tl.int64) * stride_yn + i_h * stride_yh + f[None, :]
    mask = (n[:, None] < N) & (f[None, :] < F)
    tl.store(y, tl.maximum(pos, MIN_FEATURE).to(Y.dtype.element_ty), mask=mask)
    tl.store(y + F, tl.maximum(neg, MIN_FEATURE).to(Y.dtype.element_ty), mask=mask)


def hedgehog_feature_map(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Triton twin of the reference `hedgehog_feature_map` (same arguments, result, errors)."""
    _, _, heads, dim = check_shape("x", x, "batch, time, heads, dim")
    features = check_shape("weight", weight, "heads, dim, feature_dim", (heads, dim, None))[-1]
    if not use_forward_kernel(x, weight):
        return hedgehog_feature_map_reference(x, weight)
    rows = x.reshape(-1, heads, dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape[0], heads, 2 * features, dtype=x.dtype, device=x.device)
    hedgehog_fwd_kernel[(cdiv(rows.shape[0], BLOCK_T), heads)](
        rows, weight.contiguous(), y, rows.shape[0], dim, features, rows.stride(0), rows.stride(1),
        y.stride(0), y.stride(1), BT=BLOCK_T, BD=block_size(dim), BF=block_size(features), MIN_FEATURE=MIN_FEATURE,
        NATIVE_DOT=x.dtype == weight.dtype and x.element_size() == 2,
    )
    return y.view(*x.shape[:-1], 2 * features)
