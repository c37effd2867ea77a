"""Run Triton kernels in Triton's CPU interpreter unless told otherwise: this must be set before anything imports
triton (transformers and torch can, while tests are collected), since triton fixes which of its own helper functions
run interpreted when it is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny tensors and models: intra-op threads cost more than they bring (a lot on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
