"""Depthwise causal short convolution: the reference (reference.py) and its Triton kernels (triton.py)."""
