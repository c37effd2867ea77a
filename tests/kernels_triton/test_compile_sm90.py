"""Every Triton kernel compiles for the H200 (sm_90), as the host code launches it, with the Triton under test.

The interpreter runs the kernels' logic on CPU but never compiles them, so a code-generation failure on the GPU (an
MLIR pass that rejects one block configuration, a type the backend refuses) would pass CI. Here the ops run once in
the interpreter at small sizes with fp16 inputs and default blocks, every launch is recorded, and a subprocess without
the interpreter compiles each launch's signature for sm_90 down to a cubin (Triton ships ptxas, no GPU needed), with
the fp16 pointers also as bf16, the dtype the GPU runs.
"""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from triton_helpers import INTERPRET, Rand

from hf_based.kernels.conv import triton as conv
from hf_based.kernels.glu import triton as glu
from hf_based.kernels.hedgehog import triton as hedgehog
from hf_based.kernels.hybrid import triton as hybrid
from hf_based.kernels.linear import triton as linear
from hf_based.kernels.norm import triton as norm
from hf_based.kernels.retrieval import triton as retrieval
from hf_based.kernels.rope import triton as rope
from hf_based.kernels.softmax import triton as softmax
from hf_based.kernels.taylor import triton as taylor

pytestmark = pytest.mark.skipif(not INTERPRET, reason="records launches from the interpreter")

DTYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
}
COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

failures = []
for launch in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    for half in ("fp16", "bf16"):
        signature = {name: t.replace("fp16", half) for name, t in launch["signature"].items()}
        constexprs = {(kernel.arg_names.index(name),): value for name, value in launch["constexprs"].items()}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        try:
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        except Exception as error:
            failures.append(f"{launch['kernel']} {half} {launch['constexprs']}: {str(error).splitlines()[-1][:300]}")
print(json.dumps(failures))
"""


def record_launches(monkeypatch) -> list[dict]:
    """Patch the interpreter's launch to note each kernel's argument types, constexprs and options (deduplicated)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in options}
        signature, constexprs = {}, {}
        for name, param in inspect.signature(self.fn).parameters.items():
            value = bound[name]
            if "constexpr" in str(param.annotation):
                signature[name] = "constexpr"
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + DTYPES[value.dtype]
            else:
                signature[name] = "fp32" if isinstance(value, float) else "i32"
        key = json.dumps([self.fn.__module__, self.fn.__name__, signature, constexprs, options], sort_keys=True)
        launches[key] = dict(
            module=self.fn.__module__, kernel=self.fn.__name__, signature=signature, constexprs=constexprs,
            options=options,
        )  # fmt: skip
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return launches


def run_every_kernel(monkeypatch):
    """Forward, backward and decode of every op in fp16, with key masks and states, with and without key splits."""
    rand = Rand(0)
    B, H, D = 1, 2, 16

    def half(*shape):
        return rand.normal(*shape).half().requires_grad_()

    def backward(out):
        o = out[0] if isinstance(out, tuple) else out
        o.float().sum().backward()

    def key_mask(length):
        return (torch.arange(length) >= 3)[None].expand(B, length)

    for splits in (False, True):
        monkeypatch.setattr(softmax, "multiprocessor_count", lambda device, n=64 if splits else 0: n)
        T = 600 if splits else 130  # key splits need >= 8 key tiles of 64
        for window in (None, 64):
            q, k, v = half(B, 1 if splits else T, H, D), half(B, T, 1, D), half(B, T, 1, 32)
            backward(softmax.softmax_attention(q, k, v, window=window, key_mask=key_mask(T)))
        q, k, v, qf, kf = half(B, T, H, 64), half(B, T, 1, 64), half(B, T, 1, 64), half(B, T, H, 32), half(B, T, H, 32)
        factor = rand.normal(H).requires_grad_()
        backward(hybrid.hybrid_attention(q, k, v, qf, kf, factor, 64, key_mask=key_mask(T), output_final_state=True))
    with torch.no_grad():
        state = (rand.normal(B, H, 32, 64), rand.positive(B, H, 32))
        sinks = key_mask(T) & (torch.arange(T) < 7)
        hybrid.hybrid_attention(q, k, v, qf, kf, factor, 64, key_mask=key_mask(T), sink_mask=sinks)
        for sink_mask in (None, sinks):
            hybrid.hybrid_attention_recurrent(
                q[:, -1:],
                k,
                v,
                qf[:, -1:],
                kf,
                factor,
                64,
                key_mask=key_mask(T),
                initial_state=state,
                sink_mask=sink_mask,
            )
    T = 130
    q, k, v = half(B, T, H, D), half(B, T, H, D), half(B, T, H, 64)
    backward(taylor.taylor_linear_attention(q, k, v, key_mask=key_mask(T), output_final_state=True))
    with torch.no_grad():
        _, taylor_state = taylor.taylor_linear_attention(q, k, v, output_final_state=True)
    for state in (None, tuple(x.requires_grad_() for x in taylor_state)):
        o, (kv, z) = taylor._taylor_linear_attention(q, k, v, key_mask(T), state, True, algorithm="two_pass")
        (o.float().sum() + kv.sum() + z.sum()).backward()  # the final state's gradient starts the reverse pass
    qf, kf = rand.positive(B, T, H, 32).half().requires_grad_(), rand.positive(B, T, H, 32).half().requires_grad_()
    backward(linear.linear_attention(qf, kf, v, key_mask=key_mask(T), output_final_state=True))
    with torch.no_grad():
        taylor.taylor_linear_attention_recurrent(q[:, :1], k[:, :1], v[:, :1], initial_state=taylor_state)
        _, linear_state = linear.linear_attention(qf, kf, v, output_final_state=True)
        linear.linear_attention_recurrent(qf[:, :1], kf[:, :1], v[:, :1], initial_state=linear_state)
    x, weight = half(B, T, 48), half(48, 4)
    backward(conv.short_conv(x, weight, rand.normal(48).half(), output_final_state=True))
    with torch.no_grad():
        conv.short_conv_recurrent(x[:, :1], weight, initial_state=rand.normal(B, 3, 48).half())
        norm.rms_norm(half(B, T, 576), half(576), 1e-5)
        norm.add_rms_norm(half(B, T, 576), half(B, T, 576), half(576), 1e-5)
        glu.silu_mul(half(B, T, 1536), half(B, T, 1536))
        rope.apply_rotary(half(B, T, 9, 64), half(B, T, 3, 64), half(1, T, 64), half(1, T, 64))
        retrieval.retrieval_scores(half(B, 64, 9, 64), half(B, T, 3, 64), key_mask(T))
        hedgehog.hedgehog_feature_map(half(B, T, H, 64), half(H, 64, 64))


def test_every_kernel_compiles_for_sm90(monkeypatch):
    launches = record_launches(monkeypatch)
    run_every_kernel(monkeypatch)
    kernels = {launch["kernel"] for launch in launches.values()}
    assert {
        "softmax_combine_kernel",
        "hybrid_state_fwd_kernel",
        "hybrid_decode_kernel",
        "taylor_fwd_kernel",
        "taylor_output_kernel",
        "taylor_bwd_dkv_kernel",
        "rope_fwd_kernel",
        "retrieval_weights_kernel",
        "add_rms_norm_fwd_kernel",
        "silu_mul_fwd_kernel",
    } <= kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE],
        input=json.dumps(list(launches.values())),
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
