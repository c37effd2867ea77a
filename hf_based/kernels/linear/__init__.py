"""Causal linear attention on materialised features (e.g. hedgehog): the reference (reference.py) and its Triton
kernels (triton.py)."""
