"""Where the hybrid kernel's 16-bit error comes from: its output against the fp64 reference on the same inputs
(relative L2, as `bench_kernels.py` checks it), beside the error of rounding the exact output to that dtype, for the
kernel as it runs and for parts of it switched off.

    python benchmarks/hybrid_precision.py OUT.json [--dtypes bfloat16,float16] [--length 1000]

On a GPU (bf16 and fp16), or on the CPU under TRITON_INTERPRET=1 (fp16 only: the interpreter's bf16 is broken).
Shapes as bench_kernels.py's hybrid check: batch 2, 4 heads of 128, 2 kv heads, 128 softmax features, window 64.
Variants: the whole op; the linear part alone (window factor 0); the window alone (no features); the state scan in
one segment (no sequence-parallel segments, which only a GPU with few programs takes). An error well above the
rounding's points at the part whose switch removes it.
"""

import argparse
import json
from pathlib import Path

import torch

from hf_based.kernels.hybrid import triton as hybrid
from hf_based.kernels.hybrid.reference import hybrid_attention as reference


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--length", type=int, default=1000)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    batch, length, heads, head_dim, features, window = 2, args.length, 4, 128, 128, 64
    q = torch.randn(batch, length, heads, head_dim, device=device)
    k, v = (torch.randn(batch, length, 2, head_dim, device=device) for _ in range(2))
    q_feat, k_feat = (torch.randn(batch, length, heads, features, device=device).softmax(-1) for _ in range(2))
    factor = torch.rand(heads, device=device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        for label, feats, window_factor in (
            ("whole op", features, factor),
            ("linear part alone", features, torch.zeros_like(factor)),
            ("window alone", 0, factor),
        ):
            inputs = [x.to(dtype) for x in (q, k, v, q_feat[..., :feats], k_feat[..., :feats])]
            exact = reference(*(x.double() for x in inputs), window_factor.double(), window)[0]
            results[f"{name}, {label}"] = rel_l2(hybrid.hybrid_attention(*inputs, window_factor, window)[0], exact)
            results[f"{name}, {label}: rounding of the exact output"] = rel_l2(exact.to(dtype), exact)
            if label == "whole op":
                splits, hybrid.key_splits = hybrid.key_splits, lambda *shape: 1
                try:
                    one = hybrid.hybrid_attention(*inputs, window_factor, window)[0]
                finally:
                    hybrid.key_splits = splits
                results[f"{name}, {label}, state in one segment"] = rel_l2(one, exact)
    for key, value in results.items():
        print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
