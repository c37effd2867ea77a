"""Causal sliding-window softmax attention: the reference (reference.py) and its Triton kernels (triton.py)."""
