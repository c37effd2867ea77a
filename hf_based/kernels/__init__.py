"""Pure-PyTorch reference ops for the BASED-family mixers: the spec, and the CPU path of the models.

Every op has a Triton kernel for CUDA tensors and a pure-PyTorch reference (the spec, and the CPU path).
All tensors are time-major [batch, time, heads, dim]. Ops compute in fp32 (fp64 for fp64 inputs), keep recurrent
states in that dtype and return outputs in the input dtype. Each `*_recurrent` op is the decode form of its
parallel twin, with the same signature (minus chunk_size).
"""

from hf_based.kernels import hybrid_attention as _hybrid
from hf_based.kernels import linear_attention as _linear
from hf_based.kernels import short_conv as _conv
from hf_based.kernels import softmax_attention as _softmax
from hf_based.kernels.dispatch import dispatched
from hf_based.kernels.feature_maps import hedgehog_feature_map, taylor_feature_dim, taylor_feature_map

# CUDA tensors go to the Triton kernels in hf_based/kernels/triton/ (see dispatch.py); `op.reference` is the spec.
taylor_linear_attention = dispatched(_linear.taylor_linear_attention, "taylor")
taylor_linear_attention_recurrent = dispatched(_linear.taylor_linear_attention_recurrent, "taylor")
linear_attention = dispatched(_linear.linear_attention, "linear")
linear_attention_recurrent = dispatched(_linear.linear_attention_recurrent, "linear")
softmax_attention = dispatched(_softmax.softmax_attention, "window")
hybrid_attention = dispatched(_hybrid.hybrid_attention, "window")
hybrid_attention_recurrent = dispatched(_hybrid.hybrid_attention_recurrent, "window")
short_conv = dispatched(_conv.short_conv, "conv")
short_conv_recurrent = dispatched(_conv.short_conv_recurrent, "conv")

__all__ = [
    "hedgehog_feature_map",
    "hybrid_attention",
    "hybrid_attention_recurrent",
    "linear_attention",
    "linear_attention_recurrent",
    "short_conv",
    "short_conv_recurrent",
    "softmax_attention",
    "taylor_feature_dim",
    "taylor_feature_map",
    "taylor_linear_attention",
    "taylor_linear_attention_recurrent",
]
