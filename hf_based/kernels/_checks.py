"""Argument handling shared by the reference ops: shape checks, the accumulation dtype, recurrent states.

Every check raises ValueError naming the argument, what it got and what is accepted.
"""

from functools import reduce

import torch


def check_shape(name: str, x, dims: str, sizes=None) -> torch.Size:
    """Check that `x` is a tensor with one dim per name in `dims` ("batch, time, ...") and, where `sizes` holds an
    int rather than None, exactly that size. Returns x.shape."""
    if isinstance(x, torch.Tensor):  # the common case first: every op checks several tensors per call
        shape = x.shape
        if len(shape) == dims.count(",") + 1 and (
            sizes is None or all(s is None or s == n for s, n in zip(sizes, shape))
        ):
            return shape
    names = [d.strip() for d in dims.split(",")]
    accepted = f"[{', '.join(names)}]"
    if sizes is not None and any(s is not None for s in sizes):
        accepted += " = [" + ", ".join("*" if s is None else str(s) for s in sizes) + "]"
    got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
    raise ValueError(f"{name} must have shape {accepted}, got {got}")


def check_positive_int(name: str, value, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{meaning}, got {value!r}")


def check_window(window) -> None:
    check_positive_int("window", window, " (the keys a query sees, itself included)")


def check_attention_inputs(q, k, v, key_mask) -> None:
    """q [B, Tq, H, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv], key_mask [B, Tk] or None; Tk >= Tq, Hkv divides H."""
    batch, q_len, heads, dim = check_shape("q", q, "batch, time, heads, dim")
    _, k_len, kv_heads, _ = check_shape("k", k, "batch, time, kv_heads, dim", (batch, None, None, dim))
    if k_len < q_len:
        raise ValueError(
            f"k must have at least as many time steps as q ({q_len}), since the queries are the last keys, "
            f"got {tuple(k.shape)}"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k must have a number of heads that divides q's {heads} heads, got {tuple(k.shape)}")
    check_shape("v", v, "batch, time, kv_heads, value_dim", (batch, k_len, kv_heads, None))
    if key_mask is not None:
        check_shape("key_mask", key_mask, "batch, time", (batch, k_len))


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for half, bf16 and fp32 inputs; fp64 for fp64 ones."""
    return reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def kernel_dtype(*tensors: torch.Tensor) -> torch.dtype | None:
    """The dtype a Triton kernel runs in: None for fp64 inputs; else the 16-bit dtype among the inputs if there is one
    (autocast hands over fp32 q/k after RoPE, or fp32 softmax features, next to bf16 v: compute as autocast meant),
    else fp32."""
    if accumulation_dtype(*tensors) == torch.float64:
        return None
    low = [t.dtype for t in tensors if t.dtype in (torch.bfloat16, torch.float16)]
    return low[0] if low else torch.float32


def prepare_state(initial_state, batch, heads, num_features, value_dim, dtype, device):
    """Validate a linear-attention state (kv [B, H, F, Dv], z [B, H, F]) and return it in `dtype`; zeros if None."""
    if initial_state is None:
        kv = torch.zeros(batch, heads, num_features, value_dim, dtype=dtype, device=device)
        return kv, kv.new_zeros(batch, heads, num_features)
    if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
        raise ValueError(f"initial_state must be a (kv, z) tuple of tensors, got {type(initial_state).__name__}")
    kv, z = initial_state
    state_shape = (batch, heads, num_features, value_dim)
    check_shape("initial_state kv", kv, "batch, heads, features, value_dim", state_shape)
    check_shape("initial_state z", z, "batch, heads, features", (batch, heads, num_features))
    return kv.to(dtype), z.to(dtype)
