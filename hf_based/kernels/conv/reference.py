"""Depthwise causal short convolution: y_t = sum_{i<K} weight[:, i] * x_{t-K+1+i} (+ bias).

Equal to nn.Conv1d(C, C, K, groups=C, padding=K-1)(x)[..., :T] with weight[:, None, :], but time-major and with a
state: the previous K-1 inputs (zeros if none). Padding is the caller's job (zeroing x).
"""

import torch

from hf_based.kernels._checks import accumulation_dtype, check_shape


def _prepare(x, weight, bias, initial_state):
    """Validate and cast; -> x, weight, bias (0 if None), state [B, K-1, C] in the accumulation dtype."""
    batch, _, channels = check_shape("x", x, "batch, time, channels")
    kernel_size = check_shape("weight", weight, "channels, kernel_size", (channels, None))[1]
    state_shape = (batch, kernel_size - 1, channels)
    if bias is not None:
        check_shape("bias", bias, "channels", (channels,))
    if initial_state is not None:
        check_shape("initial_state", initial_state, "batch, kernel_size - 1, channels", state_shape)
    dtype = accumulation_dtype(x, weight)
    bias = 0 if bias is None else bias.to(dtype)
    state = x.new_zeros(state_shape, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    return x.to(dtype), weight.to(dtype), bias, state


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [B, T, C]; weight: [C, K]; bias: [C] or None; initial_state: [B, K-1, C] or None.

    Returns (y [B, T, C] in x.dtype, final state = the last K-1 inputs [B, K-1, C], or None).
    """
    out_dtype, length = x.dtype, x.shape[1]
    x, weight, bias, state = _prepare(x, weight, bias, initial_state)
    xs = torch.cat([state, x], dim=1)  # [B, K-1+T, C]
    y = sum(weight[:, i] * xs[:, i : i + length] for i in range(weight.shape[1])) + bias
    return y.to(out_dtype), (xs[:, length:] if output_final_state else None)


def short_conv_recurrent(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step form (T = 1 is the decode step); same arguments and result as `short_conv`."""
    out_dtype = x.dtype
    x, weight, bias, state = _prepare(x, weight, bias, initial_state)
    ys = []
    for t in range(x.shape[1]):
        window = torch.cat([state, x[:, t : t + 1]], dim=1)  # [B, K, C]
        ys.append((window * weight.T).sum(1) + bias)
        state = window[:, 1:]
    return torch.stack(ys, dim=1).to(out_dtype), (state if output_final_state else None)
