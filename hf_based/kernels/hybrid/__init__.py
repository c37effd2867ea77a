"""LoLCATs hybrid attention (sliding-window softmax + linear attention): the reference (reference.py), its Triton
kernels (triton.py) and its blockwise PyTorch form for the CPU (chunked.py)."""
