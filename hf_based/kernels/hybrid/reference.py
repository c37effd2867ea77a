"""LoLCATs hybrid attention: sliding-window softmax + linear attention over the older keys, one shared denominator.

For the query at key position p, with s_j = scale * q.k_j, window keys W = {p - window < j <= p}, older keys
O = {j <= p - window} (padded keys in neither), c = max_{j in W} s_j and w_h the window factor of head h (the
sigmoid of the layer's `window_factors`):

    y = [sum_W w_h exp(s_j - c) v_j + phi_q(q) . (kv0 + sum_O phi_k(k_j) v_j^T)]
        / [sum_W w_h exp(s_j - c) + phi_q(q) . (z0 + sum_O phi_k(k_j))]

(kv0, z0) summarises the keys before this call's key sequence. The final state adds every key outside the window of
the *next* query, j < Tk - (window - 1); the caller keeps the last window - 1 raw keys.

Attention sinks (`sink_mask` [B, Tk]): a sink key j moves from O to W for every query p >= j, the window's softmax
sees it however old it is, and it never enters the linear part or the state (the caller keeps its raw key and value
instead). The max c then runs over the sinks too. Late sinks (`late_sink_mask`, `late_queries`): the last
`late_queries` queries see the keys of `late_sink_mask` as their sinks instead of those of `sink_mask` (a cache whose
kept keys change at the end of a prefill: the queries after the change see the new ones), and the final state leaves
out the late sinks. Either list may be given by position instead (`sink_index`, `late_sink_index`: [B, S] distinct
key positions, entries outside [0, Tk) being empty slots), as a cache that has gathered its kept keys knows them.
"""

import functools

import torch

from hf_based.kernels._checks import (
    accumulation_dtype,
    check_attention_inputs,
    check_positive_int,
    check_shape,
    check_window,
    prepare_state,
)
from hf_based.kernels.linear.reference import fold_keys
from hf_based.kernels.softmax.reference import key_distance, normalise, stable_exp


def check_inputs(q, k, v, q_feat, k_feat, window_factor, window, key_mask, sink_mask) -> int:
    """Validate the arguments of either form; -> the feature count F."""
    check_attention_inputs(q, k, v, key_mask)
    check_window(window)
    batch, q_len, heads, _ = q.shape
    k_len = k.shape[1]
    num_features = check_shape("q_feat", q_feat, "batch, time, heads, features", (batch, q_len, heads, None))[-1]
    check_shape("k_feat", k_feat, "batch, time, heads, features", (batch, k_len, heads, num_features))
    check_shape("window_factor", window_factor, "heads", (heads,))
    if sink_mask is not None:
        check_shape("sink_mask", sink_mask, "batch, time", (batch, k_len))
    return num_features


def check_late_arguments(k, late_sink_mask, late_queries) -> None:
    """Validate the late-sink arguments (after the others: `check_inputs`; a mask of None: given by position)."""
    if late_sink_mask is not None:
        check_shape("late_sink_mask", late_sink_mask, "batch, time", k.shape[:2])
    check_positive_int("late_queries", late_queries, " (the last queries, which see late_sink_mask)")


def index_mask(index: torch.Tensor, length: int) -> torch.Tensor:
    """Key positions [B, S] (entries outside [0, length): none) -> the mask [B, length] bool of the listed keys."""
    listed = torch.where((index >= 0) & (index < length), index, length)  # the empty ones into an extra column
    mask = torch.zeros(index.shape[0], length + 1, dtype=torch.bool, device=index.device)
    return mask.scatter_(1, listed.long(), True)[:, :length]


def check_sink_index(k, name: str, index: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Validate a list of sinks given by position (`name`), given instead of the mask of the same list."""
    if mask is not None:
        raise ValueError(f"{name} and {name.replace('index', 'mask')} are exclusive: give the sinks as one of them")
    check_shape(name, index, "batch, sinks", (k.shape[0], None))
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer key positions, got {index.dtype}")


def with_sink_index(op, takes_index=None):
    """`op`, a form taking its sinks as masks, given them by position too (`sink_index`, `late_sink_index`; see the
    module docstring): the lists become masks, bounded by their widths, unless `takes_index(q, k, v, q_feat, k_feat,
    window_factor, initial_state)` says that op takes them as they are."""

    @functools.wraps(op)
    def hybrid_attention(
        q, k, v, q_feat, k_feat, window_factor, window, key_mask=None, initial_state=None, output_final_state=False,
        scale=None, sink_mask=None, max_sinks=None, late_sink_mask=None, late_queries=0, max_late_sinks=None,
        sink_index=None, late_sink_index=None, **options,
    ):  # fmt: skip
        args = (q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state, output_final_state, scale)
        sinks = dict(sink_mask=sink_mask, max_sinks=max_sinks, late_sink_mask=late_sink_mask)
        sinks |= dict(max_late_sinks=max_late_sinks, late_queries=late_queries, **options)
        lists = {"sink": sink_index, "late_sink": late_sink_index}
        lists = {name: index for name, index in lists.items() if index is not None}
        for name, index in lists.items():
            check_sink_index(k, f"{name}_index", index, sinks[f"{name}_mask"])
        if lists and takes_index is not None and takes_index(q, k, v, q_feat, k_feat, window_factor, initial_state):
            return op(*args, **sinks, sink_index=sink_index, late_sink_index=late_sink_index)
        for name, index in lists.items():  # as masks, bounded by the lists' widths
            sinks[f"{name}_mask"] = index_mask(index, k.shape[1])
            sinks["max_sinks" if name == "sink" else "max_late_sinks"] = index.shape[1]
        return op(*args, **sinks)

    return hybrid_attention


def with_late_sinks(op):
    """`op`, a parallel form without late sinks, given them as two calls of itself: the last `late_queries` queries
    with `late_sink_mask` as their sinks (this call gives the final state), then every query with `sink_mask`, of
    which the rows before the late ones are kept (the queries are the last keys: the earlier rows cannot go alone)."""

    @functools.wraps(op)
    def hybrid_attention(
        q, k, v, q_feat, k_feat, window_factor, window, key_mask=None, initial_state=None, output_final_state=False,
        scale=None, sink_mask=None, max_sinks=None, late_sink_mask=None, late_queries=0, max_late_sinks=None, **options,
    ):  # fmt: skip
        def run(rows: slice, **kwargs):
            common = dict(key_mask=key_mask, initial_state=initial_state, scale=scale, **options)
            return op(q[:, rows], k, v, q_feat[:, rows], k_feat, window_factor, window, **common, **kwargs)

        if late_sink_mask is None:
            return run(slice(None), output_final_state=output_final_state, sink_mask=sink_mask, max_sinks=max_sinks)
        check_inputs(q, k, v, q_feat, k_feat, window_factor, window, key_mask, sink_mask)
        check_late_arguments(k, late_sink_mask, late_queries)
        first_late = max(q.shape[1] - late_queries, 0)
        late = slice(first_late, None)
        o, final = run(late, output_final_state=output_final_state, sink_mask=late_sink_mask, max_sinks=max_late_sinks)
        if first_late:
            early = run(slice(None), sink_mask=sink_mask, max_sinks=max_sinks)[0]
            o = torch.cat([early[:, :first_late], o], 1)
        return o, final

    return hybrid_attention


def _prepare(q, k, v, q_feat, k_feat, window_factor, window, key_mask, sink_mask, initial_state, scale):
    """Validate and cast; expand k/v to the query heads and zero the features of padded keys and sinks.

    -> q, k, v, q_feat, k_feat, window_factor, real (key mask [B, Tk] bool), sink ([B, Tk] bool), kv, z, scale.
    """
    num_features = check_inputs(q, k, v, q_feat, k_feat, window_factor, window, key_mask, sink_mask)
    batch, q_len, heads, dim = q.shape
    k_len = k.shape[1]
    dtype = accumulation_dtype(q, k, v, q_feat, k_feat)
    group = heads // k.shape[2]
    k, v = k.to(dtype).repeat_interleave(group, 2), v.to(dtype).repeat_interleave(group, 2)  # [B, Tk, H, .]
    real = torch.ones(batch, k_len, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    sink = torch.zeros_like(real)
    if sink_mask is not None:
        sink = sink_mask.bool() & real
    k_feat = k_feat.to(dtype) * (real & ~sink)[:, :, None, None]  # padded keys and sinks never enter the linear part
    kv, z = prepare_state(initial_state, batch, heads, num_features, v.shape[-1], dtype, q.device)
    scale = dim**-0.5 if scale is None else scale
    return q.to(dtype), k, v, q_feat.to(dtype), k_feat, window_factor.to(dtype), real, sink, kv, z, scale


def _final_state(kv, z, k_feat, v, window, folded=0):
    """Fold keys [folded, Tk - window + 1) into the state: all that the next query's window leaves out."""
    end = max(k_feat.shape[1] - window + 1, 0)
    return fold_keys(kv, z, k_feat[:, folded:end], v[:, folded:end])


@with_sink_index
@with_late_sinks
def hybrid_attention(
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
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Parallel form, quadratic over Tq x Tk.

    q: [B, Tq, H, D]; k: [B, Tk, Hkv, D]; v: [B, Tk, Hkv, Dv] (queries are the last Tq keys, GQA as in
    softmax_attention); q_feat: [B, Tq, H, F]; k_feat: [B, Tk, H, F] (per query head); window_factor: w_h [H];
    window: int >= 1; key_mask: [B, Tk] or None; initial_state: (kv [B, H, F, Dv], z [B, H, F]) or None;
    sink_mask: [B, Tk] bool or None, the attention sinks (see the module docstring); max_sinks: None or at least the
    most sinks of any row (as flash-attention's max_seqlen: the kernels then size their sink tiles without reading
    the count on the host; the reference has no use for it); late_sink_mask [B, Tk] bool or None, late_queries and
    max_late_sinks (see `with_late_sinks`): the sinks of the last `late_queries` queries instead, at most
    `max_late_sinks` a row; sink_index, late_sink_index: [B, S] int or None, those lists by position instead of
    sink_mask, late_sink_mask (see the module docstring).
    Returns (o [B, Tq, H, Dv] in v.dtype, final state or None).
    """
    out_dtype = v.dtype
    q, k, v, q_feat, k_feat, window_factor, real, sink, kv, z, scale = _prepare(
        q, k, v, q_feat, k_feat, window_factor, window, key_mask, sink_mask, initial_state, scale
    )
    distance = key_distance(q.shape[1], k.shape[1], q.device)  # [Tq, Tk]
    in_window = (distance >= 0) & ((distance < window) | sink[:, None, None, :]) & real[:, None, None, :]  # [B,1,Tq,Tk]
    older = distance >= window  # [Tq, Tk]; padded keys and sinks are already zero in k_feat
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # [B, H, Tq, Tk]
    linear = torch.einsum("bihf,bjhf->bhij", q_feat, k_feat) * older
    a = window_factor[:, None, None] * stable_exp(scores, in_window) + linear
    num = torch.einsum("bhij,bjhd->bihd", a, v) + torch.einsum("bihf,bhfd->bihd", q_feat, kv)
    den = a.sum(-1).transpose(1, 2) + torch.einsum("bihf,bhf->bih", q_feat, z)  # [B, Tq, H]
    return normalise(num, den).to(out_dtype), (_final_state(kv, z, k_feat, v, window) if output_final_state else None)


def hybrid_attention_recurrent(
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
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """One query at a time (Tq = 1 is the decode step), folding each key into the linear state once it leaves the
    window; same arguments and result as `hybrid_attention`."""
    out_dtype = v.dtype
    q, k, v, q_feat, k_feat, window_factor, real, sink, kv, z, scale = _prepare(
        q, k, v, q_feat, k_feat, window_factor, window, key_mask, sink_mask, initial_state, scale
    )
    q_len, k_len = q.shape[1], k.shape[1]
    outs = []
    folded = 0  # keys [0, folded) are in (kv, z)
    for i in range(q_len):
        p = k_len - q_len + i
        start = max(p - window + 1, 0)  # the window of query p is keys [start, p]
        kv, z = fold_keys(kv, z, k_feat[:, folded:start], v[:, folded:start])
        folded = start
        # The window [start, p] and the sinks before it.
        seen = real[:, : p + 1] & (sink[:, : p + 1] | (torch.arange(p + 1, device=q.device) >= start))  # [B, p + 1]
        scores = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, : p + 1]) * scale  # [B, H, p + 1]
        a = window_factor[:, None] * stable_exp(scores, seen[:, None])
        num = torch.einsum("bhj,bjhd->bhd", a, v[:, : p + 1]) + torch.einsum("bhf,bhfd->bhd", q_feat[:, i], kv)
        den = a.sum(-1) + torch.einsum("bhf,bhf->bh", q_feat[:, i], z)  # [B, H]
        outs.append(normalise(num, den))
    final_state = _final_state(kv, z, k_feat, v, window, folded) if output_final_state else None
    return torch.stack(outs, dim=1).to(out_dtype), final_state
