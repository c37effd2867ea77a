"""Where a decode step of a BASED model spends its time (CUDA): kernels of one eager step, and the graph replay.

    python benchmarks/profile_decode.py OUT_DIR [--preset based-360m] [--prompt 2048] [--batches 1,64]

Writes OUT_DIR/profile_decode.json: per batch size, the number of kernels one step launches, their summed GPU time,
the eager and CUDA-graph step times, and the 30 kernels with the most GPU time (count, microseconds).
"""

import argparse
import collections
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hf_based.bench.throughput import BasedDecoder, capture, timed_steps
from hf_based.modeling import BasedForCausalLM
from hf_based.modeling.configuration_based import preset_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--preset", default="based-360m")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--batches", default="1,64")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = BasedForCausalLM(preset_config(args.preset)).to(device, torch.bfloat16).eval()
    results = {"device": torch.cuda.get_device_name(), "preset": args.preset, "prompt": args.prompt}
    with torch.no_grad():
        for batch in map(int, args.batches.split(",")):
            decoder = BasedDecoder(model, batch, args.prompt, 64, device)
            for _ in range(3):
                decoder.step()
            eager = timed_steps(decoder.step, device, 16, 3)
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                decoder.step()
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            by_name = collections.defaultdict(lambda: [0, 0.0])
            for e in kernels:
                by_name[e.name][0] += 1
                by_name[e.name][1] += e.device_time
            replay = timed_steps(capture(decoder, device).replay, device, 32, 3)
            results[f"B{batch}"] = {
                "kernels": len(kernels),
                "kernel_us_sum": round(sum(e.device_time for e in kernels), 1),
                "eager_ms": round(eager * 1e3, 3),
                "graph_ms": round(replay * 1e3, 3),
                "top": sorted(([n[:90], c, round(t, 1)] for n, (c, t) in by_name.items()), key=lambda r: -r[2])[:30],
            }
            print(batch, {k: v for k, v in results[f"B{batch}"].items() if k != "top"}, flush=True)
            del decoder
            torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_decode.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
