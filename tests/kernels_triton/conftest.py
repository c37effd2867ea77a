"""Set-up of the Triton kernel tests (their shared inputs live in triton_helpers.py).

They run under the Triton interpreter on CPU (TRITON_INTERPRET=1, set by tests/conftest.py before anything imports
triton) with fp32 inputs and small blocks; the references run on fp64 copies. With TRITON_INTERPRET=0 and a GPU, the
same tests run the compiled kernels.
"""

import torch
from triton_helpers import INTERPRET


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
