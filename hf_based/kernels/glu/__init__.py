"""Gated linear unit activation silu(gate) * up: the reference (reference.py) and its Triton kernel (triton.py)."""
