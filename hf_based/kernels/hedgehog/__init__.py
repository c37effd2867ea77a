"""LoLCATs' hedgehog feature map: the reference (reference.py) and its Triton forward kernel (triton.py)."""
