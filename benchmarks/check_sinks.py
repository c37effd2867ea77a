"""Hybrid attention with attention sinks on a GPU, bf16: the Triton forward and decode kernels against the fp64
reference, and forward times with and without sinks (and of the blockwise PyTorch form that training runs).

    python benchmarks/check_sinks.py > check_sinks.json

Batch 2 (the second row a third padding), 9 heads over 3 kv heads of 64, 128 features, window 64, 16 sinks.
"""

import json

import torch

from hf_based.bench.throughput import timed_steps
from hf_based.kernels.hybrid import triton as hybrid
from hf_based.kernels.hybrid.chunked import hybrid_attention_chunked
from hf_based.kernels.hybrid.reference import hybrid_attention as reference

BATCH, HEADS, KV_HEADS, DIM, FEATURES, WINDOW, SINKS = 2, 9, 3, 64, 128, 64, 16


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def milliseconds(fn, repeats: int = 10) -> float:
    """Mean milliseconds of `repeats` back-to-back calls, after one that compiles."""
    fn()
    return timed_steps(fn, torch.device("cuda"), repeats, trials=1) * 1e3


def main() -> None:
    torch.manual_seed(0)
    results = {}
    for length in (300, 4096):
        q = torch.randn(BATCH, length, HEADS, DIM, device="cuda")
        k, v = (torch.randn(BATCH, length, KV_HEADS, DIM, device="cuda") for _ in range(2))
        q_feat = torch.rand(BATCH, length, HEADS, FEATURES, device="cuda")
        k_feat = torch.rand(BATCH, length, HEADS, FEATURES, device="cuda") / length  # the linear part stays O(1)
        window_factor = torch.rand(HEADS, device="cuda") * 0.8 + 0.1
        mask = torch.ones(BATCH, length, dtype=torch.bool, device="cuda")
        mask[1, : length // 3] = False
        sinks = mask & (mask.cumsum(1) <= SINKS)
        fp64 = [x.double() for x in (q, k, v, q_feat, k_feat, window_factor)]
        bf16 = [x.bfloat16() for x in (q, k, v, q_feat, k_feat)]
        expected, (kv, z) = reference(*fp64, WINDOW, key_mask=mask, output_final_state=True, sink_mask=sinks)
        o, (kv_t, z_t) = hybrid.hybrid_attention(
            *bf16, window_factor, WINDOW, key_mask=mask, output_final_state=True, sink_mask=sinks
        )
        last = [fp64[0][:, -1:], *fp64[1:3], fp64[3][:, -1:], *fp64[4:]]
        expected_step, _ = reference(*last, WINDOW, key_mask=mask, sink_mask=sinks)
        step, _ = hybrid.hybrid_attention_recurrent(
            bf16[0][:, -1:],
            *bf16[1:3],
            bf16[3][:, -1:],
            bf16[4],
            window_factor,
            WINDOW,
            key_mask=mask,
            sink_mask=sinks,
        )
        results[f"T{length}"] = {
            "fwd_o": relative_error(o, expected),
            "fwd_kv": relative_error(kv_t, kv),
            "fwd_z": relative_error(z_t, z),
            "decode_o": relative_error(step, expected_step),
            "ms": {
                "triton no sinks": milliseconds(
                    lambda: hybrid.hybrid_attention(*bf16, window_factor, WINDOW, key_mask=mask)
                ),
                "triton sinks": milliseconds(
                    lambda: hybrid.hybrid_attention(*bf16, window_factor, WINDOW, key_mask=mask, sink_mask=sinks)
                ),
                "blockwise sinks": milliseconds(
                    lambda: hybrid_attention_chunked(*bf16, window_factor, WINDOW, key_mask=mask, sink_mask=sinks)
                ),
            },
        }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
