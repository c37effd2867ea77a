"""Pure-PyTorch reference ops for the BASED-family mixers: the spec, and the CPU path of the models.

All tensors are time-major [batch, time, heads, dim]. Ops compute in fp32 (fp64 for fp64 inputs), keep recurrent
states in that dtype and return outputs in the input dtype. Each `*_recurrent` op is the decode form of its
parallel twin, with the same signature (minus chunk_size).
"""

from hf_based.kernels.feature_maps import hedgehog_feature_map, taylor_feature_dim, taylor_feature_map
from hf_based.kernels.hybrid_attention import hybrid_attention, hybrid_attention_recurrent
from hf_based.kernels.linear_attention import (
    linear_attention,
    linear_attention_recurrent,
    taylor_linear_attention,
    taylor_linear_attention_recurrent,
)
from hf_based.kernels.short_conv import short_conv, short_conv_recurrent
from hf_based.kernels.softmax_attention import softmax_attention

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
