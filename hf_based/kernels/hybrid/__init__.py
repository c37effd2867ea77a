"""LoLCATs hybrid attention (sliding-window softmax + linear attention): the reference (reference.py) and its Triton
kernels (triton.py)."""
