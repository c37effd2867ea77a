"""Check, then benchmark, hf-based's Triton kernels against their peers on one CUDA GPU.

    python benchmarks/bench_kernels.py --out DIR [--quick] [--commit SHA] [--machine NAME]

1. Ceilings measured in the same run: device-to-device copy bandwidth and a bf16 8192^3 matmul.
2. Correctness: every Triton op on fresh random bf16 inputs against the pure-PyTorch reference run in fp64
   (relative L2 error of outputs and gradients <= 1e-2; NaN fails; the allocator is poisoned with NaN first, so
   an unwritten output element shows up as NaN). Models: a forward + backward of `based-360m` and of a Llama-shaped
   hybrid model in bf16 through the Triton kernels against the same model on the reference path.
3. Timings (medians of triton.testing.do_bench, warmed up): ours vs flash-linear-attention 0.6.0
   (`fused_chunk_based`, `parallel_based`, `chunk_linear_attn`), SDPA causal (cuDNN and flash backends) and
   FlexAttention sliding window, plus decode steps and a softmax decode step. Beside each timing its floor: its
   FLOPs at the matmul ceiling or its bytes at the copy ceiling of step 1, whichever takes longer, and ms / floor.

Writes DIR/kernels.json, DIR/kernels.md and DIR/kernels.png; prints the markdown table last.
"""

import argparse
import datetime
import json
import os
import traceback
from pathlib import Path

import torch
import triton
import triton.testing

import hf_based.kernels as K

DEVICE = "cuda"
BF16 = torch.bfloat16


def bench(fn, ms=200) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=ms, return_mode="median")


def rand(*shape, dtype=BF16, scale=1.0, requires_grad=False):
    x = (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype)
    return x.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# Ceilings


def ceilings() -> dict:
    n = 1 << 28  # 1 GiB of fp32
    src, dst = torch.randn(n, device=DEVICE), torch.empty(n, device=DEVICE)
    copy_ms = bench(lambda: dst.copy_(src))
    a, b = rand(8192, 8192), rand(8192, 8192)
    mm_ms = bench(lambda: a @ b)
    del src, dst, a, b
    return {"copy_GBps": 2 * n * 4 / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


# ---------------------------------------------------------------------------------------------------------------
# Correctness


def poison_allocator(gib=4):
    """Fill free cached memory with NaN so that outputs allocated next start as NaN (catches unwritten elements)."""
    torch.cuda.empty_cache()
    block = torch.full((gib << 28,), float("nan"), device=DEVICE)
    del block


def rel_l2(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("nan")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def run_op(op, args, kwargs, backward_of=None):
    """Call op; returns (tensors to compare, grads of the inputs listed in backward_of)."""
    out = op(*args, **kwargs)
    outs = list(out) if isinstance(out, tuple) else [out]
    flat = []
    for o in outs:
        if isinstance(o, tuple):
            flat.extend(o)
        elif o is not None:
            flat.append(o)
    grads = []
    if backward_of:
        # by shape, not randn_like: that follows the output's strides, which differ between kernel and reference
        weights = torch.randn(flat[0].shape, device=flat[0].device)
        (flat[0].float() * weights).sum().backward()
        grads = [args_or_kw.grad for args_or_kw in backward_of]
    return flat, grads


def check_op(name, op, make_inputs, grad_names=()):
    """make_inputs(dtype) -> (args list, kwargs dict, dict name->tensor of differentiable inputs)."""
    torch.manual_seed(hash(name) % 2**31)
    args, kwargs, leaves = make_inputs(BF16)

    # fp64 copies of the very same values for the reference
    def to64(x):
        return x.detach().double().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x

    def convert(obj):
        if isinstance(obj, tuple):
            return tuple(convert(o) for o in obj)
        return to64(obj) if isinstance(obj, torch.Tensor) and obj.is_floating_point() else obj

    args64 = [convert(a) for a in args]
    kwargs64 = {k: convert(v) for k, v in kwargs.items()}
    leaves64 = {n: (args64 + list(kwargs64.values()))[i] for n, i in _leaf_positions(args, kwargs, leaves).items()}
    poison_allocator()
    torch.manual_seed(0)
    ours, g_ours = run_op(op, args, kwargs, [leaves[n] for n in grad_names])
    torch.manual_seed(0)
    ref, g_ref = run_op(op.reference, args64, kwargs64, [leaves64[n] for n in grad_names])
    errors = {f"out{i}": rel_l2(a, b) for i, (a, b) in enumerate(zip(ours, ref))}
    errors.update({f"d{n}": rel_l2(a, b) for n, a, b in zip(grad_names, g_ours, g_ref)})
    ok = all(e <= 1e-2 for e in errors.values())  # NaN fails
    return {"op": name, "ok": ok, "errors": errors}


def _leaf_positions(args, kwargs, leaves):
    flat = list(args) + list(kwargs.values())
    return {n: next(i for i, x in enumerate(flat) if x is t) for n, t in leaves.items()}


def two_pass_taylor(*args, **kwargs):
    """taylor_linear_attention through the chunked op's two-pass algorithm (the scan is the default)."""
    from hf_based.kernels.taylor import triton as taylor

    return taylor._taylor_linear_attention(*args, algorithm="two_pass", **kwargs)


two_pass_taylor.reference = K.taylor_linear_attention.reference


def correctness(quick: bool) -> list[dict]:
    B, H, T = 2, 4, 1000  # T not a multiple of any block size
    results = []

    def taylor_inputs(dtype, state=False, mask=False):
        q, k = rand(B, T, H, 16, requires_grad=True), rand(B, T, H, 16, requires_grad=True)
        v = rand(B, T, H, 64, requires_grad=True)
        kwargs = {}
        if state:  # a state the keys of a random prefix build: random ones can make phi(q).z cross zero
            prefix = [rand(B, 300, H, n, dtype=torch.float32) for n in (16, 16, 64)]
            kwargs["initial_state"] = K.taylor_linear_attention.reference(*prefix, output_final_state=True)[1]
            kwargs["output_final_state"] = True
        if mask:
            key_mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
            key_mask[0, :37] = False
            kwargs["key_mask"] = key_mask
        return [q, k, v], kwargs, {"q": q, "k": k, "v": v}

    checks = [
        ("taylor_linear_attention", K.taylor_linear_attention, taylor_inputs, ("q", "k", "v")),
        (
            "taylor_linear_attention+state+mask",
            K.taylor_linear_attention,
            lambda d: taylor_inputs(d, state=True, mask=True),
            (),
        ),
        ("taylor_linear_attention (two-pass)", two_pass_taylor, taylor_inputs, ("q", "k", "v")),
        (
            "taylor_linear_attention+state+mask (two-pass)",
            two_pass_taylor,
            lambda d: taylor_inputs(d, state=True, mask=True),
            (),
        ),
    ]

    def decode_inputs(dtype, feature_dim=16, features=None):
        F = features or 1 + feature_dim + feature_dim**2
        dq = feature_dim if features is None else features
        q, k, v = rand(64, 1, H, dq), rand(64, 1, H, dq), rand(64, 1, H, 64)
        if features is not None:
            q, k = q.float().softmax(-1).to(dtype), k.float().softmax(-1).to(dtype)
        state = (rand(64, H, F, 64, dtype=torch.float32), rand(64, H, F, dtype=torch.float32).abs() + 1)
        return [q, k, v], {"initial_state": state, "output_final_state": True}, {}

    checks.append(
        ("taylor_linear_attention_recurrent (decode)", K.taylor_linear_attention_recurrent, decode_inputs, ())
    )

    def feature_inputs(dtype, state=False):
        F, Dv = 128, 128
        q = rand(B, T, H, F).float().softmax(-1).to(dtype).requires_grad_()
        k = rand(B, T, H, F).float().softmax(-1).to(dtype).requires_grad_()
        v = rand(B, T, H, Dv, requires_grad=True)
        kwargs = {}
        if state:
            kwargs = {
                "initial_state": (
                    rand(B, H, F, Dv, dtype=torch.float32).abs(),
                    rand(B, H, F, dtype=torch.float32).abs() + 1,
                ),
                "output_final_state": True,
            }
        return [q, k, v], kwargs, {"q": q, "k": k, "v": v}

    checks += [
        ("linear_attention (hedgehog features)", K.linear_attention, feature_inputs, ("q", "k", "v")),
        ("linear_attention+state", K.linear_attention, lambda d: feature_inputs(d, state=True), ()),
        (
            "linear_attention_recurrent (decode)",
            K.linear_attention_recurrent,
            lambda d: decode_inputs(d, features=128),
            (),
        ),
    ]

    def window_inputs(dtype, window, head_dim=64, kv_heads=2):
        q = rand(B, T, H, head_dim, requires_grad=True)
        k = rand(B, T, kv_heads, head_dim, requires_grad=True)
        v = rand(B, T, kv_heads, head_dim, requires_grad=True)
        key_mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
        key_mask[1, :100] = False
        return [q, k, v], {"window": window, "key_mask": key_mask}, {"q": q, "k": k, "v": v}

    checks += [
        (
            "softmax_attention window=128 hd64 GQA",
            K.softmax_attention,
            lambda d: window_inputs(d, 128),
            ("q", "k", "v"),
        ),
        (
            "softmax_attention full hd128",
            K.softmax_attention,
            lambda d: window_inputs(d, None, 128, 4),
            ("q", "k", "v"),
        ),
    ]

    def hybrid_inputs(dtype, state=False):
        hd, F = 128, 128
        q = rand(B, T, H, hd, requires_grad=True)
        k, v = rand(B, T, 2, hd, requires_grad=True), rand(B, T, 2, hd, requires_grad=True)
        qf = rand(B, T, H, F).float().softmax(-1).to(dtype).requires_grad_()
        kf = rand(B, T, H, F).float().softmax(-1).to(dtype).requires_grad_()
        gamma = torch.rand(H, device=DEVICE, requires_grad=True)
        kwargs = {}
        if state:
            kwargs = {
                "initial_state": (
                    rand(B, H, F, hd, dtype=torch.float32).abs(),
                    rand(B, H, F, dtype=torch.float32).abs() + 1,
                ),
                "output_final_state": True,
            }
        leaves = {"q": q, "k": k, "v": v, "q_feat": qf, "k_feat": kf, "gamma": gamma}
        return [q, k, v, qf, kf, gamma, 64], kwargs, leaves

    def hybrid_decode_inputs(dtype, batch=64, window=64, hd=128, F=128):
        """One query after window - 1 cached keys, with a state: the hybrid layer's decode step."""
        q, k, v = rand(batch, 1, H, hd), rand(batch, window, 2, hd), rand(batch, window, 2, hd)
        qf = rand(batch, 1, H, F).float().softmax(-1).to(dtype)
        kf = rand(batch, window, H, F).float().softmax(-1).to(dtype)
        state = (rand(batch, H, F, hd, dtype=torch.float32).abs(), rand(batch, H, F, dtype=torch.float32).abs() + 1)
        gamma = torch.rand(H, device=DEVICE)
        return [q, k, v, qf, kf, gamma, window], {"initial_state": state, "output_final_state": True}, {}

    def window_decode_inputs(dtype, batch=64, window=129):
        q, k, v = rand(batch, 1, H, 64), rand(batch, window, 2, 64), rand(batch, window, 2, 64)
        key_mask = torch.ones(batch, window, dtype=torch.bool, device=DEVICE)
        key_mask[: batch // 2, :50] = False  # left-padded prompts
        return [q, k, v], {"window": window, "key_mask": key_mask}, {}

    checks += [
        (
            "hybrid_attention window=64 hedgehog",
            K.hybrid_attention,
            hybrid_inputs,
            ("q", "k", "v", "q_feat", "k_feat", "gamma"),
        ),
        ("hybrid_attention+state", K.hybrid_attention, lambda d: hybrid_inputs(d, state=True), ()),
        ("hybrid_attention_recurrent (decode)", K.hybrid_attention_recurrent, hybrid_decode_inputs, ()),
        ("softmax_attention window=129 (decode, padded)", K.softmax_attention, window_decode_inputs, ()),
    ]

    def conv_inputs(dtype):
        x, w, b = rand(B, T, 512, requires_grad=True), rand(512, 3, requires_grad=True), rand(512, requires_grad=True)
        return [x, w], {"bias": b}, {"x": x, "weight": w, "bias": b}

    checks.append(("short_conv k=3", K.short_conv, conv_inputs, ("x", "weight", "bias")))

    for name, op, make, grads in checks:
        try:
            results.append(check_op(name, op, make, grads))
        except Exception as error:  # one broken kernel must not hide the others' results
            results.append(
                {
                    "op": name,
                    "ok": False,
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(limit=4),
                }
            )
        print(results[-1], flush=True)
    return results


def model_checks() -> list[dict]:
    """Forward + backward of whole models: the Triton path in bf16 against the reference path in fp32 (the truth),
    next to the reference path in bf16 on the same weights and tokens. The kernels pass when their error is at most
    1.5x the bf16 reference's own (bf16 rounding across many layers, not a kernel, sets that level)."""
    from hf_based import BasedConfig, BasedForCausalLM, preset_config

    configs = {
        "based-360m": preset_config("based-360m"),
        "llama-shaped hybrid": BasedConfig(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=4,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
            sliding_window=64,
            feature_map="hedgehog",
            hedgehog_dim=64,
            mixer_types=["hybrid_attention"] * 3 + ["full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
    }
    results = []
    for name, config in configs.items():
        try:
            torch.manual_seed(0)
            model = BasedForCausalLM(config).to(DEVICE)
            ids = torch.randint(0, config.vocab_size, (2, 1500), device=DEVICE)
            outputs = {}
            for label, backend, dtype in (
                ("truth", "reference", torch.float32),
                ("reference bf16", "reference", BF16),
                ("triton bf16", "triton", BF16),
            ):
                os.environ["HF_BASED_KERNELS"] = backend
                model.to(dtype).zero_grad()
                out = model(ids, labels=ids, use_cache=False)
                out.loss.backward()
                outputs[label] = (
                    out.logits.detach().float(),
                    out.loss.item(),
                    {
                        n: p.grad.float().clone()
                        for n, p in model.named_parameters()
                        if p.grad is not None and ("self_attn" in n or "conv" in n)
                    },
                )
            os.environ["HF_BASED_KERNELS"] = "auto"
            truth_logits, truth_loss, truth_grads = outputs.pop("truth")
            errors = {}
            for label, (logits, loss, grads) in outputs.items():
                errors[f"{label} logits"] = rel_l2(logits, truth_logits)
                errors[f"{label} loss_abs"] = abs(loss - truth_loss)
                errors[f"{label} max_mixer_grad"] = max(rel_l2(grads[n], truth_grads[n]) for n in truth_grads)
            ok = all(
                errors[f"triton bf16 {m}"] <= 1.5 * errors[f"reference bf16 {m}"] + 1e-3
                for m in ("logits", "max_mixer_grad")
            )
            results.append({"model": name, "ok": ok, "errors": errors})
        except Exception as error:
            os.environ["HF_BASED_KERNELS"] = "auto"
            results.append(
                {
                    "model": name,
                    "ok": False,
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(limit=4),
                }
            )
        print(results[-1], flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Timings


def fwd_bwd(fn, inputs):
    def run():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)
        for x in inputs:
            x.grad = None

    out = fn()
    grad = torch.randn_like(out[0] if isinstance(out, tuple) else out)
    return run


def timings(quick: bool, ceil: dict) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    try:
        from fla.ops.based import fused_chunk_based, parallel_based
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError as error:
        print(f"flash-linear-attention missing ({error}): peers skipped", flush=True)
        fused_chunk_based = parallel_based = chunk_linear_attn = None
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []

    def record(kernel, pass_, T, ms, flops=None, nbytes=None, **shape):
        row = {"kernel": kernel, "pass": pass_, "T": T, "ms": ms, **shape}
        if flops:
            row["TFLOPs"] = flops / ms / 1e9
            row["frac_matmul_peak"] = row["TFLOPs"] / ceil["bf16_matmul_TFLOPs"]
        if nbytes:
            row["GBps"] = nbytes / ms / 1e6
            row["frac_copy_bw"] = row["GBps"] / ceil["copy_GBps"]
        if flops or nbytes:  # the floor: the FLOPs at matmul peak or the bytes at copy bandwidth, whichever is longer
            row["floor_ms"] = max(row.get(k, 0.0) * ms for k in ("frac_matmul_peak", "frac_copy_bw"))
            row["x_floor"] = ms / row["floor_ms"]
        rows.append(row)
        print(row, flush=True)

    def attempt(label, f):
        try:
            f()
        except Exception as error:
            print(f"{label}: {type(error).__name__}: {error}", flush=True)
            rows.append({"kernel": label, "error": f"{type(error).__name__}: {error}"})
        torch.cuda.empty_cache()

    B, H, d = 8, 16, 16
    lengths = [2048, 16384] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
    features = 1 + d + d * d
    for dv in (64, 128):
        for T in lengths:
            q, k = rand(B, T, H, d, requires_grad=True), rand(B, T, H, d, requires_grad=True)
            v = rand(B, T, H, dv, requires_grad=True)
            flops = 4 * B * T * H * features * dv  # state update + readout of the linear form
            nbytes = 2 * (2 * B * T * H * d + 2 * B * T * H * dv)  # read q, k, v; write o (bf16)
            shape = {"B": B, "H": H, "d": d, "dv": dv}
            for label, op in (("", K.taylor_linear_attention), (" (two-pass)", two_pass_taylor)):
                ours = lambda op=op: op(q, k, v)[0]
                attempt(
                    f"ours taylor{label} T={T} dv={dv}",
                    lambda label=label, ours=ours: (
                        record(f"ours taylor_linear_attention{label}", "fwd", T, bench(ours), flops, nbytes, **shape),
                        record(
                            f"ours taylor_linear_attention{label}",
                            "fwd+bwd",
                            T,
                            bench(fwd_bwd(ours, [q, k, v])),
                            3 * flops,
                            3 * nbytes,
                            **shape,
                        ),
                    ),
                )
            if fused_chunk_based is not None:
                fla_fc = lambda: fused_chunk_based(q, k, v, scale=d**-0.5)
                attempt(
                    f"fla fused_chunk T={T}",
                    lambda: (
                        record("fla fused_chunk_based", "fwd", T, bench(fla_fc), flops, nbytes, **shape),
                        record(
                            "fla fused_chunk_based",
                            "fwd+bwd",
                            T,
                            bench(fwd_bwd(fla_fc, [q, k, v])),
                            3 * flops,
                            3 * nbytes,
                            **shape,
                        ),
                    ),
                )
                if T <= 16384:
                    fla_par = lambda: parallel_based(q, k, v, scale=d**-0.5)
                    attempt(
                        f"fla parallel T={T}",
                        lambda: (
                            record("fla parallel_based", "fwd", T, bench(fla_par), None, nbytes, **shape),
                            record(
                                "fla parallel_based",
                                "fwd+bwd",
                                T,
                                bench(fwd_bwd(fla_par, [q, k, v])),
                                None,
                                3 * nbytes,
                                **shape,
                            ),
                        ),
                    )
            del q, k, v
            if dv == 64:  # softmax peers at head dim 64
                qs, ks, vs = (rand(B, H, T, 64, requires_grad=True) for _ in range(3))
                attn_flops = 4 * B * H * T * T * 64 / 2
                for backend_name, backend in (
                    ("cudnn", SDPBackend.CUDNN_ATTENTION),
                    ("flash", SDPBackend.FLASH_ATTENTION),
                ):

                    def sdpa(backend=backend):
                        with sdpa_kernel(backend):
                            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

                    attempt(
                        f"sdpa {backend_name} T={T}",
                        lambda: (
                            record(
                                f"sdpa {backend_name} causal hd64", "fwd", T, bench(sdpa), attn_flops, None, **shape
                            ),
                            record(
                                f"sdpa {backend_name} causal hd64",
                                "fwd+bwd",
                                T,
                                bench(fwd_bwd(sdpa, [qs, ks, vs])),
                                3.5 * attn_flops,
                                None,
                                **shape,
                            ),
                        ),
                    )
                window = 129
                block_mask = create_block_mask(
                    lambda b, h, qi, ki: (qi >= ki) & (qi - ki < window), None, None, T, T, device=DEVICE
                )
                flex_fn = lambda: flex(qs, ks, vs, block_mask=block_mask)
                qw, kw, vw = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (qs, ks, vs))
                ours_w = lambda: K.softmax_attention(qw, kw, vw, window=window)
                swa_flops = 4 * B * H * T * window * 64
                attempt(
                    f"swa T={T}",
                    lambda: (
                        record(
                            "flex_attention sliding window 129 hd64", "fwd", T, bench(flex_fn), swa_flops, None, **shape
                        ),
                        record(
                            "flex_attention sliding window 129 hd64",
                            "fwd+bwd",
                            T,
                            bench(fwd_bwd(flex_fn, [qs, ks, vs])),
                            3.5 * swa_flops,
                            None,
                            **shape,
                        ),
                        record(
                            "ours softmax_attention window 129 hd64", "fwd", T, bench(ours_w), swa_flops, None, **shape
                        ),
                        record(
                            "ours softmax_attention window 129 hd64",
                            "fwd+bwd",
                            T,
                            bench(fwd_bwd(ours_w, [qw, kw, vw])),
                            3.5 * swa_flops,
                            None,
                            **shape,
                        ),
                    ),
                )
                del qs, ks, vs, qw, kw, vw

    # LoLCATs hybrid shape: B=4, H=32, head dim 128, window 64, hedgehog features 128, T=8k
    B2, H2, T2, hd, F, W = 4, 32, 8192, 128, 128, 64
    q, k, v = (rand(B2, T2, H2, hd, requires_grad=True) for _ in range(3))
    qf = rand(B2, T2, H2, F).float().softmax(-1).to(BF16).requires_grad_()
    kf = rand(B2, T2, H2, F).float().softmax(-1).to(BF16).requires_grad_()
    gamma = torch.full((H2,), 0.1, device=DEVICE, requires_grad=True)
    shape = {"B": B2, "H": H2, "hd": hd, "F": F, "window": W}
    hybrid = lambda: K.hybrid_attention(q, k, v, qf, kf, gamma, W)[0]
    attempt(
        "ours hybrid",
        lambda: (
            record("ours hybrid_attention", "fwd", T2, bench(hybrid), **shape),
            record("ours hybrid_attention", "fwd+bwd", T2, bench(fwd_bwd(hybrid, [q, k, v, qf, kf, gamma])), **shape),
        ),
    )
    feat = lambda: K.linear_attention(qf, kf, v)[0]
    attempt(
        "ours linear_attention F=128",
        lambda: (
            record("ours linear_attention F=128", "fwd", T2, bench(feat), **shape),
            record("ours linear_attention F=128", "fwd+bwd", T2, bench(fwd_bwd(feat, [qf, kf, v])), **shape),
        ),
    )
    if chunk_linear_attn is not None:
        qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        mask = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < W), None, None, T2, T2, device=DEVICE)
        composed = lambda: (chunk_linear_attn(qf, kf, v, normalize=True)[0], flex(qh, kh, vh, block_mask=mask))

        def composed_fwd_bwd():
            lin, win = composed()
            (lin.float().sum() + win.float().sum()).backward()
            for x in (qf, kf, v, qh, kh, vh):
                x.grad = None

        attempt(
            "peers composed",
            lambda: (
                record("fla chunk_linear_attn + flex window (composed peers)", "fwd", T2, bench(composed), **shape),
                record(
                    "fla chunk_linear_attn + flex window (composed peers)",
                    "fwd+bwd",
                    T2,
                    bench(composed_fwd_bwd),
                    **shape,
                ),
            ),
        )
    del q, k, v, qf, kf

    # Decode steps: one new token, fp32 state read and written once.
    for batch in (64, 256):
        q, k, v = rand(batch, 1, 16, d), rand(batch, 1, 16, d), rand(batch, 1, 16, 64)
        state = (
            rand(batch, 16, features, 64, dtype=torch.float32),
            rand(batch, 16, features, dtype=torch.float32).abs(),
        )
        floor_bytes = 2 * 4 * batch * 16 * features * 65  # fp32 kv and z, read + write
        step = lambda: K.taylor_linear_attention_recurrent(q, k, v, initial_state=state, output_final_state=True)
        attempt(
            f"decode B={batch}",
            lambda: record(
                "ours taylor decode step (eager)",
                "decode",
                1,
                bench(step),
                None,
                floor_bytes,
                B=batch,
                H=16,
                d=d,
                dv=64,
            ),
        )

        def graphed():
            graph_stream = torch.cuda.Stream()
            with torch.cuda.stream(graph_stream):
                step()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            record(
                "ours taylor decode step (CUDA graph)",
                "decode",
                1,
                bench(graph.replay),
                None,
                floor_bytes,
                B=batch,
                H=16,
                d=d,
                dv=64,
            )

        attempt(f"decode graph B={batch}", graphed)
        hq, hk, hv = rand(batch, 1, 32, 128), rand(batch, 64, 8, 128), rand(batch, 64, 8, 128)
        hqf = rand(batch, 1, 32, 128).float().softmax(-1).to(BF16)
        hkf = rand(batch, 64, 32, 128).float().softmax(-1).to(BF16)
        hstate = (rand(batch, 32, 128, 128, dtype=torch.float32), rand(batch, 32, 128, dtype=torch.float32).abs())
        hgamma = torch.rand(32, device=DEVICE)
        hybrid_step = lambda: K.hybrid_attention_recurrent(
            hq, hk, hv, hqf, hkf, hgamma, 64, initial_state=hstate, output_final_state=True
        )
        # fp32 state read + write, window keys/values and features read (bf16)
        hybrid_bytes = 2 * 4 * batch * 32 * 128 * 129 + 2 * batch * 64 * (2 * 8 * 128 + 32 * 128)
        attempt(
            f"hybrid decode B={batch}",
            lambda: record(
                "ours hybrid decode step (eager) H=32 hd=128 F=128 w=64",
                "decode",
                1,
                bench(hybrid_step),
                None,
                hybrid_bytes,
                B=batch,
                H=32,
                hd=128,
                F=128,
                window=64,
            ),
        )
        del hq, hk, hv, hqf, hkf, hstate
        ctx = 16384
        qd = rand(batch, 16, 1, 64)
        kc, vc = rand(batch, 16, ctx, 64), rand(batch, 16, ctx, 64)
        sdpa_dec = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kc, vc)
        attempt(
            f"sdpa decode B={batch}",
            lambda: record(
                "sdpa decode step, context 16k hd64",
                "decode",
                1,
                bench(sdpa_dec),
                None,
                2 * 2 * batch * 16 * ctx * 64,
                B=batch,
                H=16,
                dv=64,
            ),
        )
        del kc, vc
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report


def markdown(report: dict) -> str:
    lines = [f"# Kernel benchmark ({report['date']}, commit {report['commit']}, {report['machine']})", ""]
    if "timings_run" in report:
        run = report["timings_run"]
        lines += [
            f"Checks from this run; ceilings and timings from the run of {run['date']} (commit {run['commit']}, "
            "same kernels).",
            "",
        ]
    lines += [
        f"Ceilings: copy {report['ceilings']['copy_GBps']:.0f} GB/s, "
        f"bf16 matmul {report['ceilings']['bf16_matmul_TFLOPs']:.0f} TFLOP/s.",
        "",
        "## Correctness",
        "",
        "| op | ok | errors |",
        "|---|---|---|",
    ]
    for r in report["correctness"] + report["models"]:
        detail = r.get("error") or ", ".join(f"{k} {v:.2e}" for k, v in r["errors"].items())
        lines.append(f"| {r.get('op', r.get('model'))} | {'yes' if r['ok'] else '**NO**'} | {detail} |")
    lines += [
        "",
        "## Timings (median ms)",
        "",
        "| kernel | pass | T | shape | ms | TFLOP/s | GB/s | floor ms | x floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["timings"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | error | | | {r['error'][:80]} | | | | |")
            continue
        shape = " ".join(f"{k}={r[k]}" for k in ("B", "H", "d", "dv", "hd", "F", "window") if k in r)
        tf = f"{r['TFLOPs']:.0f}" if "TFLOPs" in r else ""
        gb = f"{r['GBps']:.0f}" if "GBps" in r else ""
        floor = f"{r['floor_ms']:.4f} | {r['x_floor']:.1f}" if "floor_ms" in r else " | "
        lines.append(f"| {r['kernel']} | {r['pass']} | {r['T']} | {shape} | {r['ms']:.4f} | {tf} | {gb} | {floor} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, pass_ in zip(axes, ("fwd", "fwd+bwd")):
        series = {}
        for r in report["timings"]:
            if r.get("pass") == pass_ and r.get("dv", 64) == 64 and "hd" not in r:
                series.setdefault(r["kernel"], []).append((r["T"], r["ms"]))
        for name, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sequence length T",
            ylabel="ms (median)",
            title=f"{pass_}, B=8 H=16 d=16 dv=64 (softmax: hd64)",
        )
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def taylor_sweep(save) -> list[dict]:
    """Block sizes, warps and pipelining of the Taylor kernels, both algorithms of the chunked op, at B=8 H=16 d=16
    dv=64 T=16k: each variant checked (bf16 vs fp64, T=1000) before it is timed. A variant sets module constants
    (the scan's in triton.py, the two-pass op's in two_pass.py) and passes block sizes. Chunk 64 variants of the scan
    (bf16 backward faults seen there) run last."""
    from hf_based.kernels.taylor import triton as taylor
    from hf_based.kernels.taylor import two_pass

    def scan(chunk, block_v, warps, stages, programs_per_sm):
        constants = dict(NUM_WARPS=warps, NUM_STAGES=stages, PROGRAMS_PER_SM=programs_per_sm)
        return taylor, constants, dict(chunk=chunk, block_v=block_v, block_v_bwd=block_v)

    def two_passes(chunk, segment, state_rows, warps, stages):
        constants = dict(STATE_ROWS=state_rows, NUM_WARPS=warps, NUM_STAGES=stages)
        return two_pass, constants, dict(algorithm="two_pass", chunk=chunk, segment=segment)

    variants = [scan(c, bv, w, st, 4) for c in (16, 32) for bv in (16, 32, 64) for w in (4, 8) for st in (2, 3)]
    variants += [scan(32, 32, w, 3, pps) for w in (4, 8) for pps in (2, 8, 16)]
    variants += [two_passes(64, seg, rows, w, 2) for seg in (128, 256, 512) for rows in (32, 64) for w in (4, 8)] + [
        two_passes(32, 256, 64, w, st) for w in (4, 8) for st in (1, 3)
    ]
    variants += [scan(64, bv, w, 2, 4) for bv in (16, 32) for w in (4, 8)]
    B, H, d, dv, T = 8, 16, 16, 64, 16384
    q, k = rand(B, T, H, d, requires_grad=True), rand(B, T, H, d, requires_grad=True)
    v = rand(B, T, H, dv, requires_grad=True)
    qs, ks, vs = (rand(2, 1000, 4, n, requires_grad=True) for n in (d, d, dv))
    small64 = [x.detach().double().requires_grad_() for x in (qs, ks, vs)]
    expected = K.taylor_linear_attention.reference(*small64)[0]
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    rows = []
    for module, constants, blocks in variants:
        row = {"algorithm": blocks.get("algorithm", "scan"), **constants, **blocks}
        defaults = {name: getattr(module, name) for name in constants}
        for name, value in constants.items():
            setattr(module, name, value)
        try:
            for x in (qs, ks, vs):
                x.grad = None
            o = taylor._taylor_linear_attention(qs, ks, vs, **blocks)[0]
            (o.float() * weights.float()).sum().backward()
            row["err_o"] = rel_l2(o, expected)
            row.update({f"err_d{n}": rel_l2(x.grad, x64.grad) for n, x, x64 in zip("qkv", (qs, ks, vs), small64)})
            fn = lambda: taylor._taylor_linear_attention(q, k, v, **blocks)[0]
            row["fwd_ms"] = bench(fn)
            if blocks["chunk"] <= 32 or row["algorithm"] == "two_pass":
                row["fwd_bwd_ms"] = bench(fwd_bwd(fn, [q, k, v]))
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        for name, value in defaults.items():
            setattr(module, name, value)
        rows.append(row)
        print(row, flush=True)
        save(rows)
        torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="two sequence lengths only")
    parser.add_argument("--commit", default=os.environ.get("COMMIT", "unknown"))
    parser.add_argument("--machine", default=None)
    parser.add_argument(
        "--timings-from",
        metavar="JSON",
        help="reuse the ceilings and timings of an earlier run (same kernels), re-running the checks",
    )
    parser.add_argument(
        "--taylor-sweep",
        action="store_true",
        help="only time variants of the Taylor kernels' block sizes, both algorithms (writes taylor_sweep.json)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": args.commit,
        "machine": args.machine or torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
    }
    if args.taylor_sweep:

        def save_sweep(rows):
            (out / "taylor_sweep.json").write_text(json.dumps({**report, "variants": rows}, indent=1))

        taylor_sweep(save_sweep)
        return

    def save():  # after every section: a run cut short still leaves what it measured
        (out / "kernels.json").write_text(json.dumps(report, indent=1))

    earlier = json.loads(Path(args.timings_from).read_text()) if args.timings_from else None
    if earlier:
        report["timings_run"] = {key: earlier[key] for key in ("date", "commit", "machine")}
    report["ceilings"] = earlier["ceilings"] if earlier else ceilings()
    print(report, flush=True)
    report["correctness"] = correctness(args.quick)
    save()
    report["models"] = model_checks()
    save()
    report["timings"] = earlier["timings"] if earlier else timings(args.quick, report["ceilings"])
    save()
    table = markdown(report)
    (out / "kernels.md").write_text(table)
    try:
        plot(report, out / "kernels.png")
    except Exception as error:
        print(f"plot failed: {error}")
    print(table)


if __name__ == "__main__":
    main()
