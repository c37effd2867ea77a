"""Pick the implementation of each op: its Triton kernel for CUDA tensors, otherwise its CPU path where it has one
(PyTorch, cheaper than the reference at long inputs) or its pure-PyTorch reference.

`HF_BASED_KERNELS=reference` forces the reference everywhere (e.g. to compare against it on a GPU);
`HF_BASED_KERNELS=triton` refuses to fall back silently on CUDA tensors when Triton is missing.
"""

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

BACKENDS = ("auto", "reference", "triton")


def backend() -> str:
    choice = os.environ.get("HF_BASED_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"HF_BASED_KERNELS={choice!r} is not supported; accepted values: {', '.join(BACKENDS)}")
    return choice


def use_triton(x: torch.Tensor) -> bool:
    choice = backend()
    if choice == "reference" or not x.is_cuda:
        return False
    if importlib.util.find_spec("triton") is None:
        if choice == "triton":
            raise RuntimeError("HF_BASED_KERNELS=triton but triton is not installed (pip install 'hf-based[triton]')")
        return False
    return True


def dispatched(
    reference: Callable,
    load_triton: Callable[[], Callable],
    cpu: Callable | None = None,
    opaque: Callable[[Callable], Callable] | None = None,
) -> Callable:
    """Wrap `reference` so that CUDA inputs go to the Triton op that `load_triton()` returns, and other inputs to
    `cpu` if given (unless HF_BASED_KERNELS=reference). The loader imports the op's Triton module on the first CUDA
    call, since triton is an optional dependency. `opaque(run)` makes the custom op that torch.compile calls instead
    of tracing `run` (see `opaque.py`); it has no backward, so only without gradients."""

    def pytorch(*args, **kwargs):
        if cpu is not None and backend() != "reference":
            return cpu(*args, **kwargs)
        return reference(*args, **kwargs)

    def run(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))  # q or x: decides the device
        if isinstance(first, torch.Tensor) and use_triton(first):
            return load_triton()(*args, **kwargs)
        return pytorch(*args, **kwargs)

    compiled = opaque(run) if opaque is not None else None

    @functools.wraps(reference)
    def op(*args, **kwargs):
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            # Traced inference: the custom op where there is one; else the PyTorch path, which Inductor fuses (the
            # device test and the Triton module's import are not traceable and would break the graph on CUDA).
            return compiled(*args, **kwargs) if compiled is not None else pytorch(*args, **kwargs)
        return run(*args, **kwargs)

    op.reference = reference
    return op
