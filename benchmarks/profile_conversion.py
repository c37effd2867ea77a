"""Conversion throughput per stage and micro-batch shape, on a random model shaped like the teacher (no weights needed).

    python benchmarks/profile_conversion.py CONFIG_DIR OUT_DIR   # CONFIG_DIR: a Llama config.json, e.g. SmolLM2-135M's

Runs 8 steps of stage 1 and stage 2 for the hybrid and the pure-linear recipe at micro-batches 2 x 2, 4 x 1 and 8 x 1
sequences of 1024 tokens; writes OUT_DIR/profile.json (tokens/s over each stage's second half) and
OUT_DIR/prof_stage1.txt (the torch profiler's tables for one stage-1 micro-step of 2 sequences).
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from hf_based.bench.throughput import synchronize
from hf_based.conversion import Recipe
from hf_based.conversion.data import PackedData
from hf_based.conversion.linearize import AttentionTransfer, linearize_model, stage1_optimizer
from hf_based.conversion.pipeline import run_stage1, run_stage2
from hf_based.conversion.recipe import LOLCATS
from hf_based.training import Dist, autocast_for

SEQ_LEN = 1024
SHAPES = [(2, 2), (4, 1), (8, 1)]  # (sequences per micro-batch, micro-batches per step)


def main(config_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig.from_pretrained(config_dir)).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (64, SEQ_LEN))
    data, dist, work = PackedData(ids, ids.clone()), Dist(device=device), Path(tempfile.mkdtemp())
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    for name, overrides in [("hybrid", {}), ("linear_only", {"linear_only": True})]:
        for batch, accum in SHAPES:
            recipe = Recipe(batch_size=batch, grad_accum=accum, **LOLCATS, **overrides)
            student = linearize_model(teacher, recipe, device=device)
            tag = f"{name} {batch}x{accum}"
            s1 = run_stage1(student, recipe, data, 8, dist, work / f"{tag} 1.pt", {}, progress=False)
            s2 = run_stage2(student, recipe, data, 8, dist, work / f"{tag} 2.pt", {}, progress=False)
            results[tag] = {
                "stage1_tokens_per_s": s1.steady_tokens_per_second,
                "stage2_tokens_per_s": s2.steady_tokens_per_second,
            }
            print(tag, results[tag], flush=True)
            del student

    recipe = Recipe(batch_size=2, grad_accum=1, **LOLCATS)
    student = linearize_model(teacher, recipe, device=device)
    groups, _ = stage1_optimizer(student, student.config, recipe)
    modules = {i: student.model.layers[i].self_attn for i in groups}
    batch, autocast = ids[:2].to(device), autocast_for(device, recipe.precision)

    def micro_step():
        with AttentionTransfer(modules) as transfer, autocast():
            student.model(input_ids=batch, use_cache=False)
        transfer.loss(len(modules), recipe.mse_factor).backward()

    for _ in range(3):
        micro_step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        micro_step()
        synchronize(device)
        results["profiled micro-step (2 sequences) s"] = time.perf_counter() - start
    table = prof.key_averages()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    (out / "prof_stage1.txt").write_text(
        table.table(sort_by=sort, row_limit=40) + "\n\n" + table.table(sort_by="cpu_time_total", row_limit=40)
    )
    (out / "profile.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
