"""Shared set-up of the Triton kernel tests.

They run under the Triton interpreter on CPU (TRITON_INTERPRET=1, set by tests/conftest.py before anything imports
triton) with fp32 inputs and small blocks; the references run on fp64 copies. With TRITON_INTERPRET=0 and a GPU, the
same tests run the compiled kernels.
"""

import os

import pytest
import torch

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def squeeze_loop_bounds():
    """Triton 3.6's interpreter turns loop bounds into ints with int() on arrays of shape (1,), which numpy >= 2.4
    refuses (triton-lang/triton#9171, fixed after 3.6): squeeze them first."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None:  # a later Triton: nothing to work around
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


class Rand:
    """Seeded fp32 inputs on DEVICE: randn for raw values, uniform in [0.1, 1.1) for features, states and window
    factors."""

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape):
        return torch.randn(*shape, generator=self.generator).to(DEVICE)

    def positive(self, *shape):
        return (torch.rand(*shape, generator=self.generator) + 0.1).to(DEVICE)


def left_padding_mask(length):
    """[2, T] bool: row 0 all real, row 1 only its last T // 2 keys (all padding if T = 1)."""
    mask = torch.ones(2, length, dtype=torch.bool, device=DEVICE)
    mask[1, : length - length // 2] = False
    return mask


def pytest_ignore_collect(collection_path, config):
    """Without triton, or compiled without a GPU, there is nothing to run here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return True
    return not INTERPRET and not torch.cuda.is_available()


try:
    import triton  # noqa: F401
except ImportError:
    pass
else:
    if INTERPRET:
        squeeze_loop_bounds()
