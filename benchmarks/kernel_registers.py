"""Registers and spills of every Triton kernel as compiled for the H200 (sm_90), without a GPU.

    python benchmarks/kernel_registers.py OUT_DIR [--kernels taylor_]

A kernel that holds more than fits in registers spills to local memory (the stack), and its speed drops with it:
benchmarks/NOTES.md traces the Taylor scan kernels' distance from their floor to that. This runs the chunked ops'
forward and backward at model shapes in the Triton interpreter (fp16, the modules' own block sizes, 130 tokens):
Taylor linear attention (d 16, value dim 64, both algorithms), softmax attention and the LoLCATs hybrid op (head dim
128, 4 query heads on 2 kv heads, window 64, 128 features) and linear attention (128 features, head dim 128). For
every distinct launch it records the registers per thread, the spill stack in bytes per thread and the static shared
memory of the kernel compiled for sm_90 with bf16 pointers (what the GPU runs), as `cuobjdump -res-usage` reports
them (Triton ships ptxas and cuobjdump). 255 registers is the per-thread limit.

Writes OUT_DIR/registers.json and registers.md, naming the Triton version; --kernels keeps the kernels whose names
start with one of the given prefixes (comma-separated).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COMPILE = """
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
rows = []
for launch in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    signature = {name: t.replace("fp16", "bf16") for name, t in launch["signature"].items()}
    constexprs = {(kernel.arg_names.index(name),): value for name, value in launch["constexprs"].items()}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=launch["options"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\\d+)", usage))
    rows.append(dict(launch, registers=int(fields["REG"]), stack_bytes=int(fields["STACK"]),
                     shared_bytes=int(fields["SHARED"])))
print(json.dumps({"triton": triton.__version__, "rows": rows}))
"""


def run_model_shapes() -> None:
    """Forward and backward of the chunked ops at model shapes (see above), fp16."""
    from hf_based.kernels.hybrid import triton as hybrid
    from hf_based.kernels.linear import triton as linear
    from hf_based.kernels.softmax import triton as softmax
    from hf_based.kernels.taylor import triton as taylor

    torch.manual_seed(0)
    B, T, H, KV = 1, 130, 4, 2

    def half(*shape):
        return torch.randn(*shape).half().requires_grad_()

    def features(*shape):
        return torch.randn(*shape).softmax(-1).half().requires_grad_()

    def backward(out):
        o, state = out
        loss = o.float().sum() + sum(x.sum() for x in state or ())
        loss.backward()

    q, k, v = half(B, T, H, 16), half(B, T, H, 16), half(B, T, H, 64)
    for algorithm in taylor.ALGORITHMS:
        backward(taylor._taylor_linear_attention(q, k, v, None, None, True, algorithm=algorithm))
    q, k, v = half(B, T, H, 128), half(B, T, KV, 128), half(B, T, KV, 128)
    for window in (64, None):
        backward((softmax.softmax_attention(q, k, v, window=window), None))
    q_feat, k_feat, factor = features(B, T, H, 128), features(B, T, H, 128), torch.rand(H).requires_grad_()
    backward((hybrid.hybrid_attention(q, k, v, q_feat, k_feat, factor, 64)[0], None))
    backward(linear.linear_attention(q_feat, k_feat, half(B, T, H, 128), output_final_state=True))


def record_launches() -> list[dict]:
    """Every distinct kernel launch of run_model_shapes (in the interpreter), recorded as the compile test does."""
    sys.path.insert(0, str(REPO / "tests" / "kernels_triton"))
    import pytest
    from conftest import squeeze_loop_bounds
    from test_compile_sm90 import record_launches as recording

    squeeze_loop_bounds()
    with pytest.MonkeyPatch.context() as monkeypatch:
        launches = recording(monkeypatch)
        run_model_shapes()
    return list(launches.values())


def markdown(result: dict) -> str:
    lines = [
        f"# Chunked ops' Triton kernels at model shapes, compiled for sm_90 (Triton {result['triton']})",
        "",
        f"{result['date']}, commit {result['commit']}, {result['machine']}: `python benchmarks/kernel_registers.py`.",
        "",
        "| kernel | block sizes and flags | warps | stages | registers | spill stack (bytes) | shared (bytes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        options = row["options"]
        constexprs = ", ".join(f"{k}={v}" for k, v in row["constexprs"].items())
        lines.append(
            f"| {row['kernel']} | {constexprs} | {options.get('num_warps', 4)} | {options.get('num_stages', 3)} "
            f"| {row['registers']} | {row['stack_bytes']} | {row['shared_bytes']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--kernels", help="comma-separated name prefixes of the kernels to keep")
    args = parser.parse_args()
    os.environ["TRITON_INTERPRET"] = "1"  # before hf_based imports the kernels' modules
    from hf_based.bench.report import environment

    launches = record_launches()
    if args.kernels:
        launches = [x for x in launches if x["kernel"].startswith(tuple(args.kernels.split(",")))]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE], input=json.dumps(launches), capture_output=True, text=True, env=env
    )
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    result = {**environment(torch.device("cpu")), "target": "sm_90, compiled without a GPU"}
    result |= json.loads(done.stdout.strip().splitlines()[-1])  # the compiling Triton's version wins
    result["rows"].sort(key=lambda row: (row["kernel"], json.dumps(row["constexprs"], sort_keys=True)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "registers.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "registers.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
