"""Host-side helpers shared by the Triton kernels: block sizes, dot precision, memory layouts, the decode fallback.

Every kernel spells its compile-time flags alike: HAS_MASK (key_mask given), HAS_BIAS, HAS_INITIAL_STATE,
STORE_FINAL_STATE, HAS_FINAL_STATE_GRAD, STORE_INITIAL_STATE_GRAD and DOT_PRECISION (the `dot_precision` string).
"""

import torch


def cdiv(n: int, d: int) -> int:
    """ceil(n / d) for ints; triton.cdiv's host twin without its constexpr-function wrapper, which costs microseconds
    a call on every launch."""
    return -(-n // d)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1); triton.next_power_of_2 without its wrapper, as `cdiv`."""
    return 1 << max(n - 1, 0).bit_length()


def block_size(n: int, cap: int | None = None, minimum: int = 16) -> int:
    """Power-of-2 block covering a dim of size n, at least `minimum` (16 is tl.dot's smallest), at most `cap`."""
    size = max(minimum, next_power_of_2(n))
    return size if cap is None else min(size, cap)


def dot_precision(*tensors: torch.Tensor) -> str:
    """tl.dot's input_precision: fp32 operands multiply in full fp32 (the tests compare fp32 at 1e-5); 16-bit ones
    run on the tensor cores anyway, and tf32 only touches the fp32 states that fp16 inputs meet."""
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) else "tf32"


def unit_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The kernels read the last dim with stride 1 and every other dim through its stride: copy only if need be."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself if its last dim has stride 1 and its elements fill their memory span (then empty_like(x), where the
    gradients go, has x's strides and the kernels can index both alike); else a contiguous copy."""
    x = unit_last_dim(x)
    span = 1
    for stride, size in sorted((s, n) for s, n in zip(x.stride(), x.shape) if n > 1):
        if stride != span:
            return x.contiguous()
        span *= size
    return x


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd is on and wants the gradient of any of these tensors (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_decode_kernel(q: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether a recurrent op runs its fused decode kernel: one query (T = 1) and no autograd. Otherwise it runs the
    parallel op, which is the same function of the inputs."""
    return q.shape[1] == 1 and not needs_grad(q, *tensors)


def use_forward_kernel(*tensors: torch.Tensor) -> bool:
    """Whether a forward-only kernel stands in for its reference: no gradients to compute, not while torch.compile
    traces (Inductor fuses the reference itself), no fp64 input, and something to compute (the first tensor is not
    empty)."""
    return not (
        needs_grad(*tensors)
        or torch.compiler.is_compiling()
        or any(t.dtype == torch.float64 for t in tensors)
        or tensors[0].numel() == 0
    )


def bth_strides(*tensors: torch.Tensor) -> list[int]:
    """The (batch, time, head) strides of [B, T, H, D] tensors, one after the other: the kernels' stride arguments."""
    return [s for t in tensors for s in t.stride()[:3]]
