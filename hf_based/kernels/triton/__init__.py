"""Triton kernels for CUDA tensors, one module per kernel family, each function named and called like its reference in
hf_based/kernels/ (dispatch.py routes to them): taylor (BASED Taylor linear attention), linear (linear attention on
materialised features, e.g. hedgehog), window (sliding-window softmax and the LoLCATs hybrid), conv (short conv)."""
