"""Wall time against GPU time of batch-1 prefills (CUDA): the converted SmolLM2 with and without retrieval keys, and its
teacher, each an eager forward that fills a generation cache, as `hf-based bench` times it.

    python benchmarks/profile_prefill.py OUT.json [--config benchmarks/configs/smollm2-135m-instruct] [--lengths 2048,8192]

Per model and length: the wall time of one prefill (mean of 10 after 3 warm-ups), and the number of CUDA kernels and
their summed GPU time (torch.profiler). Where the wall time is well above the GPU time, the host limits the prefill.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_decode import kernel_table  # noqa: E402

from hf_based.bench.throughput import build, load_config, random_ids  # noqa: E402
from hf_based.cli.bench import converted_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--config", default="benchmarks/configs/smollm2-135m-instruct", help="the teacher's config")
    parser.add_argument("--lengths", default="2048,8192")
    args = parser.parse_args()
    device = torch.device("cuda")
    without_retrieval = converted_config(args.config)
    without_retrieval.hybrid_retrieval_keys = 0
    configs = {
        "teacher": load_config(args.config, "baseline"),
        "converted": converted_config(args.config),
        "converted, no retrieval keys": without_retrieval,
    }
    results = {}
    for name, config in configs.items():
        model = build(config, torch.bfloat16, device)
        for length in map(int, args.lengths.split(",")):
            ids = random_ids(model, 1, length, device)

            def prefill():
                model(input_ids=ids, use_cache=True, logits_to_keep=1)

            with torch.no_grad():
                for _ in range(3):
                    prefill()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(10):
                    prefill()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - start) / 10
                table = kernel_table(prefill)
            results[f"{name}, {length}"] = {"wall_ms": round(wall * 1e3, 2), **table}
            print(name, length, {k: v for k, v in results[f"{name}, {length}"].items() if k != "top"}, flush=True)
        del model
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
