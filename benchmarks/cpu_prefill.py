"""A converted layer's CPU prefill without a linear term (`window_and_sinks_sdpa`): blocks of queries against one SDPA
over the [Tq, Tk] mask, and the whole model's prefill beside its teacher's.

    python benchmarks/cpu_prefill.py OUT_DIR [--parts op,prefill] [--threads 2]

1. op: the hybrid op at SmolLM2's shape (9 heads of 64, 3 kv heads, window 64, 64 sinks, 256 retrieval keys seen by
   the last 64 queries, as a converted layer's first prefill), batch 1, 1024 and 4096 tokens, in blocks of 32, 64
   (the default), 128 and 256 queries and in one block (one SDPA over the whole mask);
2. prefill: a 1024-token prefill into an empty cache of the converted SmolLM2 config (the default recipe, random
   weights, fp32) and of its teacher's config, as the demo's speed table times it.
Median of 5 timed runs after one warm-up, on `--threads` threads. Writes OUT_DIR/results.json and results.md. The
prefill part also runs on older trees (PYTHONPATH=...), which lack the op's block argument.
"""

import argparse
import json
from pathlib import Path

import torch

from hf_based.bench import report
from hf_based.bench.throughput import build, load_config, median_seconds
from hf_based.cli.bench import converted_config

CONFIG = "benchmarks/configs/smollm2-135m-instruct"


def median_ms(fn, runs: int = 5) -> float:
    return round(1e3 * median_seconds(fn, torch.device("cpu"), runs), 2)


def time_op() -> list[dict]:
    from hf_based.kernels.hybrid.chunked import window_and_sinks_sdpa

    rows = []
    for length in (1024, 4096):
        generator = torch.Generator().manual_seed(length)
        q = torch.randn(1, length, 9, 64, generator=generator)
        k, v = (torch.randn(1, length, 3, 64, generator=generator) for _ in range(2))
        no_features = q.new_empty(1, length, 9, 0)
        sinks = torch.zeros(1, length, dtype=torch.bool)
        sinks[:, :64] = True
        late = sinks.clone()
        late[:, 64 + torch.randperm(length - 128, generator=generator)[:256]] = True
        kwargs = dict(window=64, key_mask=torch.ones(1, length, dtype=torch.bool), sink_mask=sinks)
        kwargs |= dict(late_sink_mask=late, late_queries=64)
        for block in (32, 64, 128, 256, length):
            ms = median_ms(
                lambda: window_and_sinks_sdpa(q, k, v, no_features, no_features, torch.ones(9), block=block, **kwargs)
            )
            rows.append({"tokens": length, "block": "one mask" if block == length else block, "ms": ms})
            print(rows[-1], flush=True)
    return rows


def time_prefill() -> list[dict]:
    rows = []
    ids = torch.randint(0, 49152, (1, 1024), generator=torch.Generator().manual_seed(0))
    for name, config in (("converted", converted_config(CONFIG)), ("teacher", load_config(CONFIG, "baseline"))):
        model = build(config, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            ms = median_ms(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
        rows.append({"model": name, "tokens": 1024, "ms": ms, "tokens_per_s": round(1024 / ms * 1e3, 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--parts", default="op,prefill")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    results = {**report.environment(torch.device("cpu")), "threads": args.threads}
    if "op" in parts:
        results["op"] = time_op()
    if "prefill" in parts:
        results["prefill"] = time_prefill()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# CPU prefill", "", report.environment_lines({k: v for k, v in results.items() if k not in parts}), ""]
    if "op" in results:
        rows = [[r["tokens"], r["block"], r["ms"]] for r in results["op"]]
        lines += [report.markdown_table(["tokens", "block", "ms a layer"], rows), ""]
    if "prefill" in results:
        rows = [[r["model"], r["tokens"], r["ms"], r["tokens_per_s"]] for r in results["prefill"]]
        lines += [report.markdown_table(["model", "tokens", "ms", "tokens/s"], rows)]
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
