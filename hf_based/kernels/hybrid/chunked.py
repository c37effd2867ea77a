"""LoLCATs hybrid attention in blocks of queries, in PyTorch: the reference's result in O(Tq * (chunk + window)) time
and memory instead of O(Tq * Tk). The CPU path, where the reference's [Tq, Tk] score matrices cost most of a
converted model's prefill and of each attention-transfer step.

Queries go in blocks of `chunk`. For the block whose first query sits at key position p0, the keys
[p0 - window + 1, p0 + chunk) hold every key in the window of one of its queries and every older key not yet in the
linear state; the keys before them are summed into the state, block by block (a cumulative sum). Within that range
of span = chunk + window - 1 keys, key l is in the window of the block's query i iff i <= l <= i + window - 1, and
older iff l < i: the same masks for every block. Sinks (see the reference) are gathered once and appended to every
block's range as extra keys, seen by the queries that they are older than the window of; within the range, their zero
features keep them out of the linear part.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hf_based.kernels._checks import accumulation_dtype, prepare_state
from hf_based.kernels.hybrid.reference import (
    _final_state,
    _prepare,
    check_inputs,
    check_late_arguments,
    hybrid_attention,
    hybrid_attention_recurrent,
    with_late_sinks,
    with_sink_index,
)
from hf_based.kernels.softmax.cpu import sdpa_over
from hf_based.kernels.softmax.reference import key_distance, normalise, stable_exp
from hf_based.kernels.triton_utils import needs_grad

CHUNK = 64  # the fastest of 16, 32, 64 and 128 at window 64, 1k and 4k tokens (2-core CPU)
MAX_SCORES = 2**24  # 64 MiB of fp32 scores, a few such tensors at a time


class QueryBlocks(NamedTuple):
    """The last Tq of Tk keys' queries in blocks of `chunk`, and the keys each block needs: with the keys padded by
    `front` before and `back` after, block b's range is [start + b * chunk, + span), span = chunk + window - 1, and
    its key l is in the window of its query i iff i <= l <= i + window - 1."""

    blocks: int
    chunk: int
    span: int
    front: int
    back: int
    start: int

    @classmethod
    def of(cls, q_len: int, k_len: int, window: int, chunk: int) -> "QueryBlocks":
        blocks, span = math.ceil(q_len / chunk), chunk + window - 1
        first = k_len - q_len - window + 1  # the first key of block 0's range, before padding
        front = max(0, -first)
        back = max(0, first + front + (blocks - 1) * chunk + span - (front + k_len))
        return cls(blocks, chunk, span, front, back, first + front)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Tk, ...] -> [B, front + Tk + back, ...], zeros (False) in the padding."""
        return F.pad(x, (0, 0) * (x.dim() - 2) + (self.front, self.back))

    def ranges(self, x: torch.Tensor) -> torch.Tensor:
        """Padded [B, P, ...] -> each block's range, [B, blocks, ..., span]."""
        end = self.start + (self.blocks - 1) * self.chunk + self.span
        return x[:, self.start : end].unfold(1, self.span, self.chunk)


@with_sink_index
@with_late_sinks
def hybrid_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    window_factor: torch.Tensor,
    window: int,
    key_mask: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    sink_mask: torch.Tensor | None = None,
    max_sinks: int | None = None,
    chunk: int = CHUNK,
    max_scores: int = MAX_SCORES,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Same arguments and result as `reference.hybrid_attention`; `chunk` queries a block, blocks in groups of at most
    `max_scores` score elements (at least one block)."""
    out_dtype = v.dtype
    q, k, v, q_feat, k_feat, window_factor, real, sink, kv, z, scale = _prepare(
        q, k, v, q_feat, k_feat, window_factor, window, key_mask, sink_mask, initial_state, scale
    )
    sinks = gather_sinks(sink, k, v, max_sinks) if sink_mask is not None else None
    batch, q_len, heads, _ = q.shape
    k_len = k.shape[1]
    query_blocks = QueryBlocks.of(q_len, k_len, window, chunk)
    blocks, span, front, start = query_blocks.blocks, query_blocks.span, query_blocks.front, query_blocks.start
    ranges = query_blocks.ranges
    real = query_blocks.pad(real)  # [B, P]: False for the padding
    k, v, k_feat = (query_blocks.pad(x) for x in (k, v, k_feat))  # [B, P, H, .]; k_feat 0 there

    def by_block(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, X] -> [B, blocks, chunk, H, X], zero-padded at the end
        return F.pad(x, (0, 0, 0, 0, 0, blocks * chunk - x.shape[1])).reshape(batch, blocks, chunk, heads, -1)

    # The linear state before each block's range: the keys before `start`, then each earlier block's chunk of keys.
    initial = kv, z
    kv, z = kv + torch.einsum("bthf,bthd->bhfd", k_feat[:, :start], v[:, :start]), z + k_feat[:, :start].sum(1)
    keys_f = k_feat[:, start : start + blocks * chunk].reshape(batch, blocks, chunk, heads, -1)
    keys_v = v[:, start : start + blocks * chunk].reshape(batch, blocks, chunk, heads, -1)
    kv_blocks = torch.einsum("bnchf,bnchd->bnhfd", keys_f, keys_v).cumsum(1)
    z_blocks = keys_f.sum(2).cumsum(1)
    kv_before = torch.cat([kv[:, None], kv[:, None] + kv_blocks[:, :-1]], 1)  # [B, blocks, H, F, Dv]
    z_before = torch.cat([z[:, None], z[:, None] + z_blocks[:, :-1]], 1)  # [B, blocks, H, F]

    q, q_feat = by_block(q), by_block(q_feat)
    i, l = torch.arange(chunk, device=q.device)[:, None], torch.arange(span, device=q.device)
    older = l < i  # [chunk, span]; padded keys' features are 0

    def block_outputs(n: slice) -> torch.Tensor:  # the outputs of blocks n: [B, blocks in n, chunk, H, Dv]
        in_window = (l >= i) & (l < i + window) & ranges(real)[:, n, None, None, :]  # [B, n, 1, chunk, span]
        scores = torch.einsum("bnchd,bnhds->bnhcs", q[:, n], ranges(k)[:, n]) * scale
        linear = torch.einsum("bnchf,bnhfs->bnhcs", q_feat[:, n], ranges(k_feat)[:, n]) * older
        values = ranges(v)[:, n]  # [B, n, H, Dv, span]
        if sinks is not None:  # append the sinks to every block's keys: [..., span + S]
            sink_pos, sink_k, sink_v, sink_real = sinks
            query_pos = k_len - q_len + torch.arange(blocks * chunk, device=q.device).view(blocks, 1, chunk, 1)[n]
            older_sink = sink_real[:, None, None, None, :] & (sink_pos[:, None, None, None, :] <= query_pos - window)
            scores = torch.cat([scores, torch.einsum("bnchd,bshd->bnhcs", q[:, n], sink_k) * scale], -1)
            in_window = torch.cat([in_window, older_sink], -1)
            linear = F.pad(linear, (0, sink_pos.shape[1]))
            sink_values = sink_v.permute(0, 2, 3, 1)[:, None].expand(-1, values.shape[1], -1, -1, -1)
            values = torch.cat([values, sink_values], -1)
        a = window_factor[:, None, None] * stable_exp(scores, in_window) + linear  # [B, n, H, chunk, keys]
        num = torch.einsum("bnhcs,bnhds->bnchd", a, values)
        num = num + torch.einsum("bnchf,bnhfd->bnchd", q_feat[:, n], kv_before[:, n])
        den = a.sum(-1).transpose(2, 3) + torch.einsum("bnchf,bnhf->bnch", q_feat[:, n], z_before[:, n])
        return normalise(num, den)

    # Blocks in groups whose score tensors hold at most max_scores elements: a long prompt's [B, blocks, H, chunk,
    # keys] would otherwise take gigabytes (with 64 sinks and 256 retrieval keys, some 20 GB at 8 x 8192 tokens).
    keys = span + (sinks[0].shape[1] if sinks is not None else 0)
    group = max(1, max_scores // (batch * heads * chunk * keys))
    out = torch.cat([block_outputs(slice(n, n + group)) for n in range(0, blocks, group)], 1)
    out = out.reshape(batch, blocks * chunk, heads, -1)[:, :q_len]
    if not output_final_state:
        return out.to(out_dtype), None
    return out.to(out_dtype), _final_state(
        *initial, k_feat[:, front : front + k_len], v[:, front : front + k_len], window
    )


def gather_sinks(sink: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: int | None = None):
    """The sinks of each row, in order, padded to `count` (default: the largest count of any row, read on the host):
    positions [B, S], keys [B, S, H, D], values [B, S, H, Dv] and a mask [B, S] of the real ones."""
    count = int(sink.sum(1).max()) if count is None else count
    pos, real = first_positions(sink, count)
    return pos, gather_keys(k, pos), gather_keys(v, pos), real


def first_positions(mask: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of the first `count` True entries of each row of mask [B, T], in order, and whether each is one
    ([B, min(count, T)] each; a row with fewer fills the rest with other positions, marked False)."""
    first, pos = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True)
    return pos[:, :count], first[:, :count].bool()


def gather_keys(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] at positions [B, S] of each row -> [B, S, H, D]."""
    return x.gather(1, positions[:, :, None, None].expand(-1, -1, *x.shape[2:]))


@with_sink_index
def hybrid_attention_cpu(
    q, k, v, q_feat, k_feat, window_factor, window, key_mask=None, initial_state=None, output_final_state=False,
    scale=None, sink_mask=None, max_sinks=None, late_sink_mask=None, late_queries=0, max_late_sinks=None,
):  # fmt: skip
    """The CPU path. Without a linear term and without gradients, softmax over each query's window and sinks through
    torch's SDPA (`window_and_sinks_sdpa`); otherwise the reference up to
    2 * (CHUNK + window) keys, where the quadratic form is as fast (at window 64 the blockwise form breaks even
    between 256 and 384 keys: benchmarks/results/cpu), the blockwise form beyond."""
    state = dict(initial_state=initial_state, output_final_state=output_final_state)
    sinks = dict(sink_mask=sink_mask, late_sink_mask=late_sink_mask, late_queries=late_queries)
    inputs = (q, k, v, q_feat, k_feat, window_factor)
    if not q_feat.shape[-1] and not needs_grad(*inputs):
        return window_and_sinks_sdpa(*inputs, window, key_mask=key_mask, scale=scale, **state, **sinks)
    short = k.shape[1] <= 2 * (CHUNK + window)
    op = hybrid_attention if short else hybrid_attention_chunked
    bounds = dict(max_sinks=max_sinks, max_late_sinks=max_late_sinks)
    return op(*inputs, window, key_mask=key_mask, scale=scale, **state, **sinks, **bounds)


def window_and_sinks_sdpa(
    q, k, v, q_feat, k_feat, window_factor, window, key_mask=None, initial_state=None, output_final_state=False,
    scale=None, sink_mask=None, late_sink_mask=None, late_queries=0, block=CHUNK,
):  # fmt: skip
    """Hybrid attention without a linear term (no features): softmax over each query's window and its sinks (the
    window factor cancels), through torch's SDPA. Up to `block` queries (a decode step), one call over the [B, Tq,
    Tk] mask of what each query sees; beyond, in blocks of `block` queries, each over the keys of its queries'
    windows and the sinks older than them (gathered once), so that the scores grow with Tq, not Tq x Tk; the late
    sinks join only the blocks that hold late queries. The state stays empty."""
    check_inputs(q, k, v, q_feat, k_feat, window_factor, window, key_mask, sink_mask)
    if late_sink_mask is not None:
        check_late_arguments(k, late_sink_mask, late_queries)
    (batch, q_len, heads, _), k_len = q.shape, k.shape[1]
    state = prepare_state(initial_state, batch, heads, 0, v.shape[-1], accumulation_dtype(q, k, v), q.device)
    state = tuple(x.clone() for x in state) if output_final_state else None  # new tensors, as the reference's
    if q_len <= block:
        sinks = torch.zeros(batch, 1, k_len, dtype=torch.bool, device=q.device)
        if sink_mask is not None:
            sinks = sink_mask.bool()[:, None]
        if late_sink_mask is not None:  # [B, Tq, Tk]: the last late_queries rows see the late sinks instead
            late_rows = torch.arange(q_len, device=q.device)[:, None] >= q_len - late_queries
            sinks = torch.where(late_rows, late_sink_mask.bool()[:, None], sinks)
        distance = key_distance(q_len, k_len, q.device)
        seen = (distance >= 0) & ((distance < window) | sinks)
        if key_mask is not None:
            seen = seen & key_mask.bool()[:, None]
        return sdpa_over(q, k, v, seen[:, None], scale), state
    real = key_mask.bool() if key_mask is not None else torch.ones(batch, k_len, dtype=torch.bool, device=q.device)
    first_late = q_len if late_sink_mask is None else max(q_len - late_queries, 0)
    # The sinks of the queries before first_late, then those of the others: (positions, keys, values, taken, late).
    lists = [
        (*gather_sinks(mask.bool() & real, k, v), late)
        for mask, late in ((sink_mask, False), (late_sink_mask, True))
        if mask is not None
    ]
    query_blocks = QueryBlocks.of(q_len, k_len, window, block)  # each block's keys: the windows of its queries
    blocks, span = query_blocks.blocks, query_blocks.span
    k, v, real = (query_blocks.pad(x) for x in (k, v, real))

    def ranges(x: torch.Tensor) -> torch.Tensor:  # padded [B, P, ...] -> [B, blocks, span, ...]
        return query_blocks.ranges(x).movedim(-1, 2)

    query = torch.arange(blocks * block, device=q.device).view(blocks, block)  # [blocks, block]
    position = k_len - q_len + query
    c, l = torch.arange(block, device=q.device)[:, None], torch.arange(span, device=q.device)
    window_keys = (ranges(k), ranges(v), (l >= c) & (l < c + window) & ranges(real)[:, :, None, :])
    q = F.pad(q, (0, 0, 0, 0, 0, blocks * block - q_len)).view(batch, blocks, block, heads, -1)

    def attend(n: slice, with_late: bool) -> torch.Tensor:  # the outputs of blocks n: [B, n, block, H, Dv]
        keys, values, seen = (x[:, n] for x in window_keys)
        for pos, sink_k, sink_v, taken, late in lists:
            if late and not with_late:
                continue
            rows = (query[n] >= first_late) == late  # [n, block]: the queries that see this list
            older = pos[:, None, None, :] <= position[n][None, :, :, None] - window  # [B, n, block, S]
            keys = torch.cat([keys, sink_k[:, None].expand(-1, keys.shape[1], -1, -1, -1)], 2)
            values = torch.cat([values, sink_v[:, None].expand(-1, values.shape[1], -1, -1, -1)], 2)
            seen = torch.cat([seen, older & taken[:, None, None, :] & rows[None, :, :, None]], -1)
        keys, values, seen = keys.flatten(0, 1), values.flatten(0, 1), seen.flatten(0, 1)[:, None]
        o = sdpa_over(q[:, n].flatten(0, 1), keys, values, seen, scale)
        return o.view(batch, -1, block, *o.shape[2:])

    late_from = first_late // block if late_sink_mask is not None else blocks  # the first block with late queries
    parts = [attend(slice(0, late_from), False)] if late_from else []
    if late_from < blocks:
        parts.append(attend(slice(late_from, blocks), True))
    return torch.cat(parts, 1).flatten(1, 2)[:, :q_len], state


def hybrid_attention_recurrent_cpu(q, k, v, q_feat, k_feat, window_factor, window, *args, **kwargs):
    """The CPU path of the decode step (the op's arguments): without a linear term (no features), one query's output is
    softmax attention over its window and the sinks (`window_and_sinks_sdpa`); otherwise the reference."""
    op = window_and_sinks_sdpa if q.shape[1] == 1 and not q_feat.shape[-1] else hybrid_attention_recurrent
    return op(q, k, v, q_feat, k_feat, window_factor, window, *args, **kwargs)
