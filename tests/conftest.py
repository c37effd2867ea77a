"""Run Triton kernels in Triton's CPU interpreter unless told otherwise: this must be set before anything imports
triton (transformers and torch can, while tests are collected), since triton fixes which of its own helper functions
run interpreted when it is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
