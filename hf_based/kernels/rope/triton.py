"""RoPE of queries and keys in one kernel, one program per token: the reference's ten elementwise kernels per layer
(five for q, five for k) become one launch, which is what small models' prefill and decode steps pay for. It rounds
to the input dtype after each product and after the sum, as the reference's ops do.
Forward only: with gradients to compute, and while torch.compile traces (`use_forward_kernel`), the reference runs."""

import torch
import triton
import triton.language as tl

from hf_based.kernels._checks import check_shape
from hf_based.kernels.rope.reference import apply_rotary as apply_rotary_reference
from hf_based.kernels.triton_utils import next_power_of_2, use_forward_kernel


@triton.jit
def _rotate(X, Y, COS, SIN, row_x, row_y, stride_xh, stride_yh, heads, HALF, BH: tl.constexpr, BD: tl.constexpr):
    h = tl.arange(0, BH)[:, None]
    d = tl.arange(0, BD)[None, :]
    mask = (h < heads) & (d < HALF)
    dtype = Y.dtype.element_ty
    cos1 = tl.load(COS + d, mask=d < HALF, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    x1 = tl.load(X + row_x + h * stride_xh + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + row_x + h * stride_xh + HALF + d, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = [-x2, x1]
    y1 = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
    y2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    tl.store(Y + row_y + h * stride_yh + d, y1.to(dtype), mask=mask)
    tl.store(Y + row_y + h * stride_yh + HALF + d, y2.to(dtype), mask=mask)


@triton.jit
def rope_fwd_kernel(
    Q, K, COS, SIN, QO, KO,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_cb, stride_ct,
    T, H, HKV, HALF,
    BH: tl.constexpr, BHKV: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    b, t = token // T, token % T
    cos, sin = COS + b * stride_cb + t * stride_ct, SIN + b * stride_cb + t * stride_ct
    # The outputs are contiguous [B, T, heads, 2 * HALF].
    _rotate(Q, QO, cos, sin, b * stride_qb + t * stride_qt, token * H * 2 * HALF, stride_qh, 2 * HALF, H, HALF, BH, BD)
    _rotate(
        K, KO, cos, sin, b * stride_kb + t * stride_kt, token * HKV * 2 * HALF, stride_kh, 2 * HALF, HKV, HALF, BHKV, BD
    )


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of the reference `apply_rotary` (same arguments and result)."""
    batch, length, heads, dim = q.shape
    check_shape("k", k, "batch, time, heads, dim", (batch, length, None, dim))
    for name, x in (("cos", cos), ("sin", sin)):
        check_shape(name, x, "batch, time, dim", (None, length, dim))
    if (
        not use_forward_kernel(q, k, cos, sin)
        or dim % 2
        or cos.shape[0] not in (1, batch)
        or len({q.dtype, k.dtype, cos.dtype, sin.dtype}) > 1
    ):
        return apply_rotary_reference(q, k, cos, sin)
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out, k_out = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k))
    cos_batch_stride = cos.stride(0) if cos.shape[0] > 1 else 0
    rope_fwd_kernel[(batch * length,)](
        q, k, cos, sin, q_out, k_out, *q.stride()[:3], *k.stride()[:3], cos_batch_stride, cos.stride(1),
        length, heads, k.shape[2], dim // 2,
        BH=next_power_of_2(heads), BHKV=next_power_of_2(k.shape[2]), BD=next_power_of_2(dim // 2),
    )  # fmt: skip
    return q_out, k_out
