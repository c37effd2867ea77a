"""Pick the implementation of each op: Triton kernels for CUDA tensors, the pure-PyTorch reference otherwise.

`HF_BASED_KERNELS=reference` forces the reference everywhere (e.g. to compare against it on a GPU);
`HF_BASED_KERNELS=triton` refuses to fall back silently on CUDA tensors when Triton is missing.
"""

import functools
import importlib
import importlib.util
import os

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


def dispatched(reference, triton_module: str):
    """Wrap `reference` so CUDA inputs go to the same-named op of `hf_based.kernels.triton.<triton_module>`."""

    @functools.wraps(reference)
    def op(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))  # q or x: decides the device
        if isinstance(first, torch.Tensor) and use_triton(first):
            module = importlib.import_module(f"hf_based.kernels.triton.{triton_module}")
            return getattr(module, reference.__name__)(*args, **kwargs)
        return reference(*args, **kwargs)

    op.reference = reference
    return op
