"""Retrieval scores in two kernels: the log-sum-exp of each query row over its visible keys (in parts of the keys
that run in parallel), then for each block of keys the max over query rows of exp(score - lse), summed over heads. The
reference's twenty-odd kernels (a [H, n, Tk] score tensor, masks, max, exp, sums) become two launches and a pool: one
hybrid layer's share of a prefill's host time.
Forward only (the scores choose keys; nothing differentiates them); fp64 and traced calls run the reference."""

import torch
import triton
import triton.language as tl

from hf_based.kernels._checks import check_shape
from hf_based.kernels.retrieval.reference import pool_neighbours
from hf_based.kernels.retrieval.reference import retrieval_scores as retrieval_scores_reference
from hf_based.kernels.softmax.triton import LOG2E, key_mask_arg, key_splits, split_range
from hf_based.kernels.triton_utils import block_size, cdiv, dot_precision, next_power_of_2, use_forward_kernel

BLOCK_Q, BLOCK_N = 64, 64


@triton.jit
def _scores(Q, K, MASK, b, h, hk, rows, cols, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
            Tq, Tk, D, scale_log2, BD: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """[BQ, BN] scores (log2 units) of query rows `rows` of head h against keys `cols`; -inf where not visible."""
    d = tl.arange(0, BD)
    q = tl.load(
        Q + b * stride_qb + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
        mask=(rows < Tq)[:, None] & (d < D)[None, :], other=0.0,
    )  # fmt: skip
    k = tl.load(
        K + b * stride_kb + cols[None, :] * stride_kt + hk * stride_kh + d[:, None],
        mask=(cols < Tk)[None, :] & (d < D)[:, None], other=0.0,
    )  # fmt: skip
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
    visible = (cols[None, :] <= (Tk - Tq + rows)[:, None]) & (cols < Tk)[None, :]
    if HAS_MASK:
        visible &= (tl.load(MASK + b * Tk + cols, mask=cols < Tk, other=0) != 0)[None, :]
    return tl.where(visible, s, float("-inf"))


@triton.jit
def retrieval_lse_kernel(
    Q, K, MASK, M, L, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    H, G, Tq, Tk, D, scale_log2, NQB, SPLITS, split_tiles,
    BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The max and the sum of exp2(score - max) of each query row over one part of the keys (the parts run in
    parallel: at batch 1 there are only B * H rows of programs): M, L [B, H, SPLITS, Tq]."""
    i_sq, i_bh = tl.program_id(0), tl.program_id(1)
    split, i_q = i_sq // NQB, i_sq % NQB
    b, h = i_bh // H, i_bh % H
    rows = i_q * BQ + tl.arange(0, BQ)
    m = tl.full([BQ], float("-inf"), tl.float32)
    l = tl.zeros([BQ], tl.float32)
    start = split * split_tiles * BN
    for tile in range(0, split_tiles):
        s = _scores(Q, K, MASK, b, h, h // G, rows, start + tile * BN + tl.arange(0, BN), stride_qb, stride_qt,
                    stride_qh, stride_kb, stride_kt, stride_kh, Tq, Tk, D, scale_log2, BD, HAS_MASK, DOT_PRECISION)  # fmt: skip
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows without a visible key yet
        l = l * tl.exp2(m - shift) + tl.sum(tl.exp2(s - shift[:, None]), 1)
        m = m_new
    offset = (i_bh * SPLITS + split) * Tq + rows
    tl.store(M + offset, m, mask=rows < Tq)
    tl.store(L + offset, l, mask=rows < Tq)


@triton.jit
def retrieval_weights_kernel(
    Q, K, MASK, M, L, W, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    H, G, Tq, Tk, D, scale_log2, SPLITS,
    BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    i_n, b = tl.program_id(0), tl.program_id(1)
    cols = i_n * BN + tl.arange(0, BN)
    parts = tl.arange(0, BS)[:, None]
    acc = tl.zeros([BN], tl.float32)
    for h in range(H):
        best = tl.zeros([BN], tl.float32)
        for start in range(0, Tq, BQ):
            rows = start + tl.arange(0, BQ)
            # Each row's log-sum-exp from the parts' (max, sum); +inf for a row without any visible key, whose
            # weights exp2(s - lse) are then 0.
            part = ((b * H + h) * SPLITS + parts) * Tq + rows[None, :]
            valid = (parts < SPLITS) & (rows < Tq)[None, :]
            m_part = tl.load(M + part, mask=valid, other=float("-inf"))
            m = tl.max(m_part, 0)
            shift = tl.where(m == float("-inf"), 0.0, m)
            l = tl.sum(tl.load(L + part, mask=valid, other=0.0) * tl.exp2(m_part - shift[None, :]), 0)
            lse = tl.where(l > 0, shift + tl.log2(tl.where(l > 0, l, 1.0)), float("inf"))
            s = _scores(Q, K, MASK, b, h, h // G, rows, cols, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt,
                        stride_kh, Tq, Tk, D, scale_log2, BD, HAS_MASK, DOT_PRECISION)  # fmt: skip
            best = tl.maximum(best, tl.max(tl.exp2(s - lse[:, None]), 0))
        acc += best
    tl.store(W + b * Tk + cols, acc, mask=cols < Tk)


def retrieval_scores(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of the reference `retrieval_scores` (same arguments and result)."""
    batch, length, heads, dim = q.shape
    check_shape("k", k, "batch, time, heads, dim", (batch, None, None, dim))
    if key_mask is not None:
        check_shape("key_mask", key_mask, "batch, time", k.shape[:2])
    if not use_forward_kernel(q, k) or heads % k.shape[2] or length > k.shape[1] or q.dtype != k.dtype:
        return retrieval_scores_reference(q, k, key_mask)
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    keys = k.shape[1]
    mask, has_mask = key_mask_arg(key_mask, q)
    BQ = block_size(length, BLOCK_Q)
    query_blocks, key_tiles = cdiv(length, BQ), cdiv(keys, BLOCK_N)
    splits, split_tiles = split_range(key_tiles, key_splits(batch * heads * query_blocks, key_tiles, q.device))
    m, l = (torch.empty(batch, heads, splits, length, dtype=torch.float32, device=q.device) for _ in range(2))
    weights = torch.empty(batch, keys, dtype=torch.float32, device=q.device)
    args = (*q.stride()[:3], *k.stride()[:3], heads, heads // k.shape[2], length, keys, dim, dim**-0.5 * LOG2E)
    meta = dict(BQ=BQ, BN=BLOCK_N, BD=block_size(dim), HAS_MASK=has_mask, DOT_PRECISION=dot_precision(q))
    retrieval_lse_kernel[(splits * query_blocks, batch * heads)](
        q, k, mask, m, l, *args, query_blocks, splits, split_tiles, **meta
    )
    retrieval_weights_kernel[(key_tiles, batch)](
        q, k, mask, m, l, weights, *args, splits, BS=next_power_of_2(splits), **meta
    )
    return pool_neighbours(weights)
