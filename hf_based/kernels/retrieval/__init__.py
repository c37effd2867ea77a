"""Retrieval scores of keys (how much the last queries attend to each): the reference (reference.py) and its Triton
kernels (triton.py)."""
