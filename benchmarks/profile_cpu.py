"""Where the demo's time goes on a CPU, and what the blockwise hybrid attention (kernels/hybrid/chunked.py) saves.

    python benchmarks/profile_cpu.py CONFIG_DIR OUT_DIR   # CONFIG_DIR: the teacher's config.json, e.g. the demo's
                                                          # $HF_BASED_CACHE/SmolLM2-135M-Instruct-Q4_1

Each measurement runs once per hybrid path: the reference (HF_BASED_KERNELS=reference) and the CPU path (the
default: the reference up to 256 keys at window 64, the blockwise form beyond):
1. hybrid attention alone at SmolLM2's shape (9 heads of 64, 3 kv heads, 128 hedgehog features, window 64):
   forward+backward at B2 x T256 (a demo stage-1 micro-step), T384, T512 and B1 x T1024, forward at B1 x T1024 and
   T4096;
2. one stage-1 micro-step of the demo (2 sequences of 256 tokens; softmax layers 8, 17-20 and 23, the default
   recipe's choice for SmolLM2) on a randomly initialised model of the teacher's shape, with the torch profiler's
   ops by self time;
3. a 1024-token prefill of that converted model (the demo's speed table), beside the teacher's.
Median of 3 timed runs after one warm-up. Writes OUT_DIR/results.json, results.md and profile_<path>.txt.
"""

import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from hf_based.bench import report
from hf_based.bench.throughput import median_seconds
from hf_based.conversion import Recipe
from hf_based.conversion.linearize import AttentionTransfer, linearize_model, stage1_optimizer
from hf_based.kernels import hybrid_attention
from hf_based.training import autocast_for

PATHS = {"reference": "reference", "cpu_path": "auto"}  # name -> HF_BASED_KERNELS
DEMO_SOFTMAX_LAYERS = (8, 17, 18, 19, 20, 23)
HEADS, KV_HEADS, HEAD_DIM, FEATURES, WINDOW = 9, 3, 64, 128, 64
ATTENTION_CASES = [(2, 256, True), (2, 384, True), (2, 512, True), (1, 1024, True), (1, 1024, False), (1, 4096, False)]


def median_ms(fn, runs: int = 3) -> float:
    return 1e3 * median_seconds(fn, torch.device("cpu"), runs)


def attention_case(batch: int, length: int, backward: bool):
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False, positive=False):
        x = torch.rand(*shape, generator=generator) if positive else torch.randn(*shape, generator=generator)
        return x.requires_grad_(grad and backward)

    q, k = rand(batch, length, HEADS, HEAD_DIM, grad=True), rand(batch, length, KV_HEADS, HEAD_DIM)
    v = rand(batch, length, KV_HEADS, HEAD_DIM)
    q_feat = rand(batch, length, HEADS, FEATURES, grad=True, positive=True)
    k_feat = rand(batch, length, HEADS, FEATURES, grad=True, positive=True)
    factor = rand(HEADS, positive=True)

    def run():
        with torch.set_grad_enabled(backward):
            out, _ = hybrid_attention(q, k, v, q_feat, k_feat, factor, WINDOW)
            if backward:
                out.square().sum().backward()

    return run


def main(config_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig.from_pretrained(config_dir)).eval()
    recipe = Recipe(batch_size=2, grad_accum=1, softmax_layers=DEMO_SOFTMAX_LAYERS)
    student = linearize_model(teacher, recipe, device=torch.device("cpu"))
    groups, _ = stage1_optimizer(student, student.config, recipe)
    modules = {i: student.model.layers[i].self_attn for i in groups}
    ids = torch.randint(0, teacher.config.vocab_size, (2, 256))
    prompt = torch.randint(0, teacher.config.vocab_size, (1, 1024))
    autocast = autocast_for(torch.device("cpu"), recipe.precision)

    def micro_step():
        with AttentionTransfer(modules) as transfer, autocast():
            student.model(input_ids=ids, use_cache=False)
        transfer.loss(len(modules), recipe.mse_factor).backward()

    def prefill():
        with torch.no_grad():
            student(prompt, use_cache=False, logits_to_keep=1)

    def teacher_prefill():
        with torch.no_grad():
            teacher(prompt, use_cache=False, logits_to_keep=1)

    results = {"environment": report.environment(torch.device("cpu")), "attention_ms": {}, "model_ms": {}}
    results["teacher_prefill_ms"] = median_ms(teacher_prefill)
    for path, backend in PATHS.items():
        os.environ["HF_BASED_KERNELS"] = backend
        for batch, length, backward in ATTENTION_CASES:
            case = f"B{batch} T{length} {'fwd+bwd' if backward else 'fwd'}"
            ms = median_ms(attention_case(batch, length, backward), runs=1 if length > 1024 else 3)
            results["attention_ms"].setdefault(case, {})[path] = ms
            print(path, case, f"{ms:.1f} ms", flush=True)
        results["model_ms"].setdefault("stage-1 micro-step, 2 x 256 tokens", {})[path] = median_ms(micro_step)
        results["model_ms"].setdefault("prefill, 1 x 1024 tokens", {})[path] = median_ms(prefill)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            micro_step()
        (out / f"profile_{path}.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(path, results["model_ms"], flush=True)
    report.write_json(out / "results.json", results)
    rows = [
        [what, f"{ms['reference']:.1f}", f"{ms['cpu_path']:.1f}", f"{ms['reference'] / ms['cpu_path']:.2f}x"]
        for table in ("attention_ms", "model_ms")
        for what, ms in results[table].items()
    ]
    (out / "results.md").write_text(
        "# Hybrid attention on the CPU: the reference vs the CPU path (blockwise beyond 256 keys)\n\n"
        f"{report.environment_lines(results['environment'])}\n\n"
        f"Milliseconds, median of 3 (1 at T4096). SmolLM2-135M's shape: {HEADS} heads of {HEAD_DIM}, {KV_HEADS} kv "
        f"heads, {FEATURES} hedgehog features, window {WINDOW}; the model rows on a random model of the teacher's "
        f"config with softmax layers {list(DEMO_SOFTMAX_LAYERS)}.\n\n"
        + report.markdown_table(["", "reference", "CPU path", "speed-up"], rows)
        + f"\n\nThe teacher's 1024-token prefill in the same run (SDPA): {results['teacher_prefill_ms']:.1f} ms.\n"
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
