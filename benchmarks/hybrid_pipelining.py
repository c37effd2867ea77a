"""The hybrid kernels' feature loops (forward, dq, dk/dv), which run unpipelined (num_stages=1), against the same
kernels with them software-pipelined as the rest of the kernel: errors of the output and gradients against fp64,
and fwd / fwd+bwd times.

    python benchmarks/hybrid_pipelining.py OUT.json

On a GPU. Errors: fp16, batch 2, T 1000, 4 heads of 128, 2 kv heads, window 64, features F in 64-256, the linear part
alone (window factor 0) and the whole op, relative L2 beside the rounding of the exact output. Times: bf16, the
issue table's shape (batch 4, T 8192, 32 heads of 128, 8 kv heads, 128 features, window 64), triton's do_bench.
A variant is the kernel module's source with some loops pipelined, loaded as a module of its own.
"""

import argparse
import importlib.util
import inspect
import json
import tempfile
from pathlib import Path

import torch
import triton.testing
from hybrid_precision import rel_l2

from hf_based.kernels.hybrid import triton as hybrid
from hf_based.kernels.hybrid.reference import hybrid_attention as reference

UNPIPELINED = "for f0 in tl.range(0, F, BK, num_stages=1):"
PIPELINED = "for f0 in range(0, F, BK):"
LOOPS = ("forward", "dq", "dk/dv")  # the unpipelined loops, in source order


def variant(pipelined: set[str], folder: Path):
    """The kernel module with the feature loops named in `pipelined` pipelined (the kernel's num_stages)."""
    parts = inspect.getsource(hybrid).split(UNPIPELINED)
    assert len(parts) == len(LOOPS) + 1, "the kernels' unpipelined feature loops changed"
    source = parts[0] + "".join(
        (PIPELINED if loop in pipelined else UNPIPELINED) + part for loop, part in zip(LOOPS, parts[1:])
    )
    path = folder / f"hybrid_variant_{len(list(folder.iterdir()))}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_grads(op, inputs, grad_out):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    o = op(*inputs, window=64)[0]
    return o, torch.autograd.grad(o, inputs, grad_out.to(o.dtype))


def exact_cases(features: int) -> dict:
    """The error check's inputs at `features` features, per part, with the fp64 reference's output and gradients
    (computed once, for every variant)."""
    torch.manual_seed(0)
    q = torch.randn(2, 1000, 4, 128, device="cuda")
    k, v = (torch.randn(2, 1000, 2, 128, device="cuda") for _ in range(2))
    q_feat, k_feat = (torch.randn(2, 1000, 4, features, device="cuda").softmax(-1) for _ in range(2))
    grad_out = torch.randn_like(q)
    cases = {}
    for part, factor in (("linear part", torch.zeros(4, device="cuda")), ("whole op", torch.rand(4, device="cuda"))):
        inputs = [x.half() for x in (q, k, v, q_feat, k_feat)] + [factor]
        cases[part] = (inputs, grad_out, *with_grads(reference, [x.double() for x in inputs], grad_out))
    return cases


def errors(module, cases: dict) -> dict:
    found = {}
    for part, (inputs, grad_out, exact, exact_grads) in cases.items():
        o, grads = with_grads(module.hybrid_attention, inputs, grad_out)
        row = {"o": rel_l2(o, exact), "rounding of o": rel_l2(exact.half(), exact)}
        for name, grad, exact_grad in zip(("dq", "dk", "dv", "dq_feat", "dk_feat"), grads, exact_grads):
            if exact_grad.norm() > 0:  # without the window, q and k get none
                row[name] = rel_l2(grad, exact_grad)
        found[part] = {key: float(f"{x:.3g}") for key, x in row.items()}
    return found


def times(module) -> dict:
    torch.manual_seed(0)
    batch, length, heads, kv_heads, head_dim, features = 4, 8192, 32, 8, 128, 128
    q = torch.randn(batch, length, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(batch, length, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2)
    )
    q_feat, k_feat = (
        torch.randn(batch, length, heads, features, device="cuda").softmax(-1).bfloat16().requires_grad_()
        for _ in range(2)
    )
    factor, grad_out = torch.rand(heads, device="cuda"), torch.randn_like(q)
    inputs = (q, k, v, q_feat, k_feat)

    def forward():
        return module.hybrid_attention(*inputs, factor, 64)[0]

    def forward_backward():
        torch.autograd.grad(forward(), inputs, grad_out)

    ms = {
        name: triton.testing.do_bench(fn, warmup=50, rep=300)
        for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward))
    }
    return {f"{name} ms": round(x, 3) for name, x in ms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "triton": triton.__version__}
    variants = {
        "as shipped (feature loops unpipelined)": set(),
        "forward loop pipelined": {"forward"},
        "backward loops pipelined": {"dq", "dk/dv"},
        "all pipelined": set(LOOPS),
    }
    cases = {f"F={f}": exact_cases(f) for f in (64, 128, 192, 256)}
    with tempfile.TemporaryDirectory() as folder:
        for label, pipelined in variants.items():
            module = variant(pipelined, Path(folder))
            row = {key: errors(module, found) for key, found in cases.items()} | {"times": times(module)}
            results[label] = row
            print(label, json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
