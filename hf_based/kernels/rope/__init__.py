"""Rotary position embedding of queries and keys: the reference (reference.py) and its Triton kernel (triton.py)."""
