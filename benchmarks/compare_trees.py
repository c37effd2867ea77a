"""Time the same kernel calls from two source trees of hf-based in one run on one GPU (e.g. before and after a
change), after checking each against the fp64 reference.

    python benchmarks/compare_trees.py --trees OLD_DIR NEW_DIR --out DIR

Each tree runs in its own process (its `hf_based` first on PYTHONPATH), alternating twice so that drift of the GPU
clock does not favour one; medians of triton.testing.do_bench. Writes DIR/compare.json and prints a table.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = {  # name: (B, T, H, head dim, features)
    "linear_attention F=128, T=8k": (4, 8192, 32, 128, 128),
    "hybrid_attention w=64, F=128, T=8k": (4, 8192, 32, 128, 128),
    "linear_attention decode, B=64": (64, 1, 32, 128, 128),
    "hybrid_attention decode, B=64": (64, 1, 32, 128, 128),
}


def time_cases() -> dict:
    import torch
    import triton.testing

    import hf_based.kernels as K

    torch.manual_seed(0)
    results = {}
    for name, (B, T, H, D, F) in CASES.items():
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
        qf, kf = (torch.rand(B, T, H, F, device="cuda").softmax(-1).bfloat16().requires_grad_() for _ in "qk")
        factor = torch.full((H,), 0.3, device="cuda", requires_grad=True)
        state = (torch.rand(B, H, F, D, device="cuda"), torch.rand(B, H, F, device="cuda") + 1) if T == 1 else None
        if name.startswith("linear"):
            op = K.linear_attention_recurrent if T == 1 else K.linear_attention
            args = (qf, kf, v)
        else:
            op = K.hybrid_attention_recurrent if T == 1 else K.hybrid_attention
            args = (q, k, v, qf, kf, factor, 64)
        call = lambda: op(*args, initial_state=state)[0]  # noqa: E731
        # Checked on the first sequence's first 1k tokens: the fp64 reference of the window is quadratic in memory.
        small = [a[:1, :1024] if torch.is_tensor(a) and a.dim() == 4 else a for a in args]
        small_state = tuple(s[:1] for s in state) if state else None
        with torch.no_grad():
            out = op(*small, initial_state=small_state)[0].double()
            ref = op.reference(
                *[a.double() if torch.is_tensor(a) else a for a in small],
                initial_state=tuple(s.double() for s in small_state) if state else None,
            )[0]
        error = float((out - ref).norm() / ref.norm())
        record = {"rel_error": error, "fwd_ms": triton.testing.do_bench(lambda: call(), return_mode="median")}
        if T > 1:
            grad = torch.randn_like(call())
            record["fwd_bwd_ms"] = triton.testing.do_bench(lambda: call().backward(grad), return_mode="median")
        results[name] = record
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs=2, metavar=("OLD", "NEW"))
    parser.add_argument("--out")
    parser.add_argument("--time-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_only:
        print(json.dumps(time_cases()))
        return
    runs = {tree: [] for tree in args.trees}
    for _ in range(2):
        for tree in args.trees:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
            done = subprocess.run([sys.executable, __file__, "--time-only"], env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{tree}: {done.stderr.strip().splitlines()[-1]}")
            runs[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {}
    for tree, trials in runs.items():
        summary[tree] = {
            case: {key: min(t[case][key] for t in trials) if key.endswith("ms") else trials[0][case][key]
                   for key in trials[0][case]}
            for case in CASES
        }  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "compare.json").write_text(json.dumps({"trees": args.trees, "results": summary}, indent=1))
    old, new = args.trees
    for case in CASES:
        for key in summary[new][case]:
            print(f"{case:40s} {key:10s} {summary[old][case][key]:.4g} -> {summary[new][case][key]:.4g}")


if __name__ == "__main__":
    main()
