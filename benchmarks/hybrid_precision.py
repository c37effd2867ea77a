"""Where the hybrid kernel's 16-bit error comes from: its output against the fp64 reference on the same inputs
(relative L2, as `bench_kernels.py` checks it), beside the error of rounding the exact output to that dtype, for the
kernel as it runs and for parts of it switched off.

    python benchmarks/hybrid_precision.py OUT.json [--dtypes bfloat16,float16] [--length 1000]

On a GPU (bf16 and fp16), or on the CPU under TRITON_INTERPRET=1 (fp16 only: the interpreter's bf16 is broken).
Shapes as bench_kernels.py's hybrid check: batch 2, 4 heads of 128, 2 kv heads, 128 softmax features, window 64.
Variants: the whole op; the linear part alone (window factor 0); the window alone (no features); the state scan in
one segment (no sequence-parallel segments, which only a GPU with few programs takes). An error well above the
rounding's points at the part whose switch removes it. Then, for the linear part in fp16: its chunk states against
cumulative sums, its error per block of queries, and its error with pipelining off and other block sizes.
"""

import argparse
import json
from pathlib import Path
from unittest.mock import patch

import torch

from hf_based.kernels.hybrid import triton as hybrid
from hf_based.kernels.hybrid.reference import hybrid_attention as reference


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def linear_part_diagnosis(q, k, v, q_feat, k_feat, window, dtype) -> dict:
    """The linear part alone (window factor 0) in `dtype`: the chunk states HS the state kernel stores against
    cumulative sums in fp32 (their worst relative error, and each chunk's), the output's error per block of queries,
    and the error with the kernels' pipelining, feature chunks or value blocks changed (module constants)."""
    q, k, v, q_feat, k_feat = (x.to(dtype) for x in (q, k, v, q_feat, k_feat))
    heads, kv_heads = q.shape[2], k.shape[2]
    zero = torch.zeros(heads, device=q.device)
    exact = reference(*(x.double() for x in (q, k, v, q_feat, k_feat)), zero.double(), window)[0]
    BT, NQ, b0, m_min = hybrid._hybrid_layout(q, k, window)
    # sum_{j < b} phi_k(k_j) v_j^T for every b, per head (kv heads repeated)
    states = torch.cumsum(
        k_feat.float()[..., None] * v.float().repeat_interleave(heads // kv_heads, 2)[..., None, :], 1
    )

    def run() -> dict:
        (hs, _), _ = hybrid._hybrid_state(k_feat, v, None, None, None, window, BT, NQ, b0, m_min, True, False)
        chunk_errors = []
        for m in range(NQ):
            end = min(b0 + m * BT, q.shape[1])  # keys before chunk m's queries' windows
            expected = states[:, end - 1] if end > 0 else torch.zeros_like(states[:, 0])
            chunk_errors.append(rel_l2(hs[:, :, m], expected) if end > 0 else hs[:, :, m].float().abs().max().item())
        o = hybrid.hybrid_attention(q, k, v, q_feat, k_feat, zero, window)[0].double()
        per_query = (o - exact).norm(dim=-1).sum(dim=(0, 2)) / exact.norm(dim=-1).sum(dim=(0, 2)).clamp_min(1e-30)
        return {
            "output": rel_l2(o, exact),
            "chunk states, worst": max(chunk_errors),
            "chunk states": [float(f"{e:.3g}") for e in chunk_errors],
            "output by query block": [float(f"{per_query[i : i + BT].mean():.3g}") for i in range(0, q.shape[1], BT)],
        }

    found = {"as it runs": run()}
    for name, value in (("NUM_STAGES", 1), ("BLOCK_K", 32), ("BLOCK_K", 128), ("BLOCK_V", 128)):
        with patch.object(hybrid, name, value):
            found[f"{name} = {value}"] = {key: x for key, x in run().items() if not isinstance(x, list)}
    return found


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
                with patch.object(hybrid, "key_splits", lambda *shape: 1):
                    one = hybrid.hybrid_attention(*inputs, window_factor, window)[0]
                results[f"{name}, {label}, state in one segment"] = rel_l2(one, exact)
    results["linear part, where"] = linear_part_diagnosis(q, k, v, q_feat, k_feat, window, torch.float16)
    for key, value in results.items():
        print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
