"""The ops of the BASED-family mixers, each with a Triton kernel for CUDA tensors and a pure-PyTorch reference (the
spec, and the CPU path, except for hybrid attention, its blockwise `hybrid/chunked.py` (and, without a linear term,
a decode step through torch's fused softmax kernel), and softmax attention, that fused kernel in `softmax/cpu.py`).

All tensors are time-major [batch, time, heads, dim]. Ops compute in fp32 (fp64 for fp64 inputs), keep recurrent
states in that dtype and return outputs in the input dtype. Each `*_recurrent` op is the decode form of its
parallel twin, with the same signature (minus chunk_size).

One folder per op, `<op>/reference.py` and `<op>/triton.py`: taylor (BASED Taylor linear attention), linear (linear
attention on materialised features, e.g. hedgehog), softmax (sliding-window softmax attention), hybrid (LoLCATs
sliding-window softmax + linear attention, and `chunked.py`), conv (short convolution), norm (RMSNorm, and with a
residual add), glu (silu(gate) * up), rope (rotary embedding of queries and keys), retrieval (which keys a prompt's
last queries attend to) and hedgehog (LoLCATs' feature map; `feature_maps.py` has BASED's Taylor map).
`dispatch.py` picks one per call; `op.reference` is the spec. Under torch.compile the decode-step ops are custom ops
(`opaque.py`).
"""

from hf_based.kernels._checks import check_attention_inputs
from hf_based.kernels.conv import reference as conv_reference
from hf_based.kernels.dispatch import dispatched
from hf_based.kernels.feature_maps import taylor_feature_map, taylor_num_features
from hf_based.kernels.glu import reference as glu_reference
from hf_based.kernels.hedgehog import reference as hedgehog_reference
from hf_based.kernels.hybrid import reference as hybrid_reference
from hf_based.kernels.hybrid.chunked import hybrid_attention_cpu, hybrid_attention_recurrent_cpu
from hf_based.kernels.linear import reference as linear_reference
from hf_based.kernels.norm import reference as norm_reference
from hf_based.kernels.opaque import (
    opaque_hybrid_attention_recurrent,
    opaque_linear_attention_recurrent,
    opaque_short_conv_recurrent,
    opaque_softmax_attention,
)
from hf_based.kernels.retrieval import reference as retrieval_reference
from hf_based.kernels.rope import reference as rope_reference
from hf_based.kernels.softmax import reference as softmax_reference
from hf_based.kernels.softmax.cpu import causal_attention_sdpa, plain_causal, softmax_attention_sdpa
from hf_based.kernels.taylor import reference as taylor_reference


# The Triton modules, imported on the first CUDA call (triton is an optional dependency).
def _taylor_triton():
    from hf_based.kernels.taylor import triton

    return triton


def _linear_triton():
    from hf_based.kernels.linear import triton

    return triton


def _softmax_cuda(q, k, v, window=None, key_mask=None, scale=None):
    """Plain causal attention through SDPA (see `softmax/cpu.py`), every other call through the Triton kernel."""
    if plain_causal(q, k, v, window, key_mask):
        check_attention_inputs(q, k, v, key_mask)
        return causal_attention_sdpa(q, k, v, scale)
    from hf_based.kernels.softmax import triton

    return triton.softmax_attention(q, k, v, window, key_mask, scale)


def _hybrid_triton():
    from hf_based.kernels.hybrid import triton

    return triton


def _hedgehog_triton():
    from hf_based.kernels.hedgehog import triton

    return triton


def _glu_triton():
    from hf_based.kernels.glu import triton

    return triton


def _norm_triton():
    from hf_based.kernels.norm import triton

    return triton


def _rope_triton():
    from hf_based.kernels.rope import triton

    return triton


def _retrieval_triton():
    from hf_based.kernels.retrieval import triton

    return triton


def _conv_triton():
    from hf_based.kernels.conv import triton

    return triton


# The dispatch table: each op's reference, its Triton kernel and, where one pays off, its CPU path.
taylor_linear_attention = dispatched(
    taylor_reference.taylor_linear_attention, lambda: _taylor_triton().taylor_linear_attention
)
taylor_linear_attention_recurrent = dispatched(
    taylor_reference.taylor_linear_attention_recurrent,
    lambda: _taylor_triton().taylor_linear_attention_recurrent,
    opaque=lambda run: opaque_linear_attention_recurrent("taylor_linear_attention_recurrent", run, taylor=True),
)
linear_attention = dispatched(linear_reference.linear_attention, lambda: _linear_triton().linear_attention)
linear_attention_recurrent = dispatched(
    linear_reference.linear_attention_recurrent,
    lambda: _linear_triton().linear_attention_recurrent,
    opaque=lambda run: opaque_linear_attention_recurrent("linear_attention_recurrent", run, taylor=False),
)
softmax_attention = dispatched(
    softmax_reference.softmax_attention,
    lambda: _softmax_cuda,
    cpu=softmax_attention_sdpa,
    opaque=opaque_softmax_attention,
)
hybrid_attention = dispatched(
    hybrid_reference.hybrid_attention, lambda: _hybrid_triton().hybrid_attention, cpu=hybrid_attention_cpu
)
hybrid_attention_recurrent = dispatched(
    hybrid_reference.hybrid_attention_recurrent,
    lambda: _hybrid_triton().hybrid_attention_recurrent,
    cpu=hybrid_attention_recurrent_cpu,
    opaque=opaque_hybrid_attention_recurrent,
)
short_conv = dispatched(conv_reference.short_conv, lambda: _conv_triton().short_conv)
rms_norm = dispatched(norm_reference.rms_norm, lambda: _norm_triton().rms_norm)
add_rms_norm = dispatched(norm_reference.add_rms_norm, lambda: _norm_triton().add_rms_norm)
silu_mul = dispatched(glu_reference.silu_mul, lambda: _glu_triton().silu_mul)
retrieval_scores = dispatched(retrieval_reference.retrieval_scores, lambda: _retrieval_triton().retrieval_scores)
apply_rotary = dispatched(rope_reference.apply_rotary, lambda: _rope_triton().apply_rotary)
hedgehog_feature_map = dispatched(
    hedgehog_reference.hedgehog_feature_map, lambda: _hedgehog_triton().hedgehog_feature_map
)
short_conv_recurrent = dispatched(
    conv_reference.short_conv_recurrent, lambda: _conv_triton().short_conv_recurrent, opaque=opaque_short_conv_recurrent
)

__all__ = [
    "add_rms_norm",
    "apply_rotary",
    "hedgehog_feature_map",
    "hybrid_attention",
    "hybrid_attention_recurrent",
    "linear_attention",
    "linear_attention_recurrent",
    "retrieval_scores",
    "rms_norm",
    "short_conv",
    "short_conv_recurrent",
    "silu_mul",
    "softmax_attention",
    "taylor_feature_map",
    "taylor_linear_attention",
    "taylor_linear_attention_recurrent",
    "taylor_num_features",
]
