"""Causal normalised linear attention on feature-mapped queries and keys.

    o_t = phi(q_t) . kv_t / (phi(q_t) . z_t + eps)
    kv_t = kv_0 + sum_{j<=t} phi(k_j) v_j^T,  z_t = z_0 + sum_{j<=t} phi(k_j)

The state (kv [B, H, F, Dv], z [B, H, F]) summarises every key seen so far; padded keys (key_mask = 0) never
enter it, which matters because phi(0) != 0 for the Taylor map.
"""

import torch

from hf_based.kernels._checks import accumulation_dtype, check_positive_int, check_shape, prepare_state


def fold_keys(kv, z, k, v):
    """Add keys k [B, T, H, F] with values v [B, T, H, Dv] to the state kv [B, H, F, Dv], z [B, H, F]."""
    return kv + torch.einsum("bthf,bthd->bhfd", k, v), z + k.sum(1)


def _prepare(q, k, v, key_mask, initial_state):
    """Validate, cast to the accumulation dtype, mask the padded keys; -> q, k, v, kv, z."""
    batch, length, heads, num_features = check_shape("q", q, "batch, time, heads, features")
    check_shape("k", k, "batch, time, heads, features", (batch, length, heads, num_features))
    value_dim = check_shape("v", v, "batch, time, heads, value_dim", (batch, length, heads, None))[-1]
    dtype = accumulation_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if key_mask is not None:
        check_shape("key_mask", key_mask, "batch, time", (batch, length))
        k = k * key_mask[:, :, None, None].to(dtype)
    kv, z = prepare_state(initial_state, batch, heads, num_features, value_dim, dtype, q.device)
    return q, k, v, kv, z


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    eps: float = 1e-12,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Parallel (training / prefill) form, chunked: quadratic within a chunk, the running state across chunks.

    q, k: [B, T, H, F] features; v: [B, T, H, Dv]; key_mask: [B, T] (1 = real token) or None;
    initial_state: (kv [B, H, F, Dv], z [B, H, F]) or None. Returns (o [B, T, H, Dv] in v.dtype, final state or None).
    """
    check_positive_int("chunk_size", chunk_size)
    out_dtype = v.dtype
    q, k, v, kv, z = _prepare(q, k, v, key_mask, initial_state)
    outs = []
    for start in range(0, q.shape[1], chunk_size):
        qc, kc, vc = (x[:, start : start + chunk_size] for x in (q, k, v))  # [B, C, H, .]
        scores = torch.einsum("bihf,bjhf->bhij", qc, kc).tril()  # [B, H, C, C], key j <= query i
        num = torch.einsum("bhij,bjhd->bihd", scores, vc) + torch.einsum("bihf,bhfd->bihd", qc, kv)
        den = scores.sum(-1).transpose(1, 2) + torch.einsum("bihf,bhf->bih", qc, z)  # [B, C, H]
        outs.append(num / (den[..., None] + eps))
        kv, z = fold_keys(kv, z, kc, vc)
    return torch.cat(outs, dim=1).to(out_dtype), ((kv, z) if output_final_state else None)


def linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Token-by-token form (T = 1 is the decode step); same arguments and result as `linear_attention`."""
    out_dtype = v.dtype
    q, k, v, kv, z = _prepare(q, k, v, key_mask, initial_state)
    outs = []
    for t in range(q.shape[1]):
        kv, z = fold_keys(kv, z, k[:, t : t + 1], v[:, t : t + 1])  # inclusive: key t is visible to query t
        qt = q[:, t]  # [B, H, F]
        outs.append(torch.einsum("bhf,bhfd->bhd", qt, kv) / (torch.einsum("bhf,bhf->bh", qt, z)[..., None] + eps))
    return torch.stack(outs, dim=1).to(out_dtype), ((kv, z) if output_final_state else None)
