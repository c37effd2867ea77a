"""BASED Taylor linear attention: the reference (reference.py) and its Triton kernels (triton.py)."""
