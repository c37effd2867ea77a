"""Where a decode step of a BASED model spends its time (CUDA): kernels of one eager step, and the graph replay.

    python benchmarks/profile_decode.py OUT_DIR [--model based-360m] [--prompt 2048] [--batches 1,64] [--prefill N]
        [--no-key-splits] [--compile]

--model: a preset, a checkpoint directory, or converted:LLAMA_CONFIG, as in `hf-based bench` (random weights).
--no-key-splits profiles the kernels without splitting key ranges across programs (softmax flash-decoding, hybrid
state-scan segments), for a before/after in one run. --compile profiles the decode step with the model's forward
compiled by torch.compile (inductor's default mode; the graph replay captures the compiled step), which fuses the
elementwise work around the kernels.
Writes OUT_DIR/profile_decode[-no-key-splits][-compiled].json: per batch size, the number of kernels one step launches, their
summed GPU time, the eager and CUDA-graph step times, and the 30 kernels with the most GPU time (count, microseconds);
with --prefill, the same for one batch-1 prefill. For the eager steps and the prefill also where the host time goes:
the 40 Python functions with the most own time (cProfile: calls, own ms, cumulative ms) and the host-device
synchronisations (CUDA sync debug mode), which keep the host from running ahead of the GPU.
"""

import argparse
import collections
import cProfile
import json
import pstats
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hf_based.bench.throughput import BasedDecoder, load_config, timed_steps
from hf_based.cli.bench import CONVERTED, converted_config
from hf_based.kernels.softmax import triton as softmax_triton
from hf_based.modeling import BasedForCausalLM
from hf_based.modeling.prefill_graphs import capture


def kernel_table(run) -> dict:
    """CUDA kernels of one run(): their number, summed GPU time and the 30 names with the most (count, microseconds)."""
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.device_time
    return {
        "kernels": len(kernels),
        "kernel_us_sum": round(sum(e.device_time for e in kernels), 1),
        "top": sorted(([n[:90], c, round(t, 1)] for n, (c, t) in by_name.items()), key=lambda r: -r[2])[:30],
    }


def host_table(run) -> dict:
    """Where one run()'s host time goes: Python functions by own time, and the synchronising CUDA calls."""
    profiler = cProfile.Profile()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        profiler.enable()
        run()
        profiler.disable()
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [str(w.message)[:160] for w in caught if "synchroniz" in str(w.message)]
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, ...)
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:40]
    return {
        "host_ms": round(sum(s[2] for s in stats.values()) * 1e3, 2),
        "syncs": len(syncs),
        "sync_messages": sorted(set(syncs))[:5],
        "host_top": [
            [f"{Path(file).name}:{line}:{name}", calls, round(own * 1e3, 3), round(total * 1e3, 3)]
            for (file, line, name), (_, calls, own, total, _) in top
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--model", default="based-360m", help="a preset, a checkpoint, or converted:LLAMA_CONFIG")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prefill", type=int, help="also profile a batch-1 prefill of this many tokens")
    parser.add_argument("--no-key-splits", action="store_true", help="no key splits (see above)")
    parser.add_argument("--compile", action="store_true", help="the decode step's forward compiled (see above)")
    args = parser.parse_args()
    if args.no_key_splits:
        softmax_triton.multiprocessor_count = lambda device: 0  # key_splits() is then 1 everywhere
    device = torch.device("cuda")
    torch.manual_seed(0)
    if args.model.startswith(CONVERTED):
        config = converted_config(args.model.removeprefix(CONVERTED))
    else:
        config = load_config(args.model, "model")
    model = BasedForCausalLM(config).to(device, torch.bfloat16).eval()
    results = {
        "device": torch.cuda.get_device_name(),
        "model": args.model,
        "prompt": args.prompt,
        "key_splits": not args.no_key_splits,
        "compiled": args.compile,
    }
    with torch.no_grad():
        for batch in map(int, args.batches.split(",")):
            # Room for every step below (warm-up, eager, profiled, graph capture and replays): a static cache's
            # full-attention buffers must not overflow.
            decoder = BasedDecoder(model, batch, args.prompt, 256, device)
            if args.compile:  # after the eager prefill: only the decode step's shapes are compiled
                decoder.model = torch.compile(model, dynamic=False)
            for _ in range(3):
                decoder.step()
            eager = timed_steps(decoder.step, device, 16, 3)
            table = kernel_table(decoder.step)
            host = host_table(decoder.step)
            replay = timed_steps(capture(decoder.step, device).replay, device, 32, 3)
            results[f"B{batch}"] = {"eager_ms": round(eager * 1e3, 3), "graph_ms": round(replay * 1e3, 3), **table}
            results[f"B{batch}"]["host"] = host
            print(batch, {k: v for k, v in results[f"B{batch}"].items() if k not in ("top", "host")}, flush=True)
            del decoder
            torch.cuda.empty_cache()
        if args.prefill:
            ids = torch.randint(config.vocab_size, (1, args.prefill), device=device)

            def prefill():
                model(input_ids=ids, use_cache=True, logits_to_keep=1)

            prefill()
            seconds = timed_steps(prefill, device, 3, 3)
            entry = {"ms": round(seconds * 1e3, 3), **kernel_table(prefill), "host": host_table(prefill)}
            results[f"prefill {args.prefill}"] = entry
            print("prefill", {k: v for k, v in entry.items() if k not in ("top", "host")}, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "profile_decode" + "-no-key-splits" * args.no_key_splits + "-compiled" * args.compile + ".json"
    (Path(args.out) / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
