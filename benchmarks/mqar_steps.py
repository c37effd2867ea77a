"""Training-step times of `hf-based mqar`'s models: eager, replayed from CUDA graphs, and several runs trained
together on streams; and the sweep wall time they imply.

    python benchmarks/mqar_steps.py OUT.json [--protocol based-paper] [--together 4] [--cycles 3] [--families A,B]

For each model of the protocol, three ways to train it: eager, one run alone; CUDA graphs, one run alone; CUDA
graphs, `together` runs at once (the protocol's learning rates, repeated), on the same batches, each on its own
stream (`hf-based mqar --together`). Each is timed over `cycles` passes of the training cycle (its shapes in the
proportions the sweep trains them, fresh batches as the sweep samples them) after one warm-up pass (kernels compiled,
graphs captured). A run-step is one run's optimizer step: together, the round's time over the runs in it.

The implied sweep time is runs x max_steps x run-step time, without early stops: an upper bound on the training part
of `hf-based mqar --protocol P` in one process (evaluation and compilation come on top).
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from hf_based.bench.mqar import Run, step_together, training_batch
from hf_based.bench.mqar_sweeps import SWEEPS
from hf_based.bench.report import environment
from hf_based.bench.throughput import synchronize

MODES = ("eager", "graphs", "together")


def run_step_time(spec, settings, device, graphs: bool, count: int, cycles: int) -> float:
    """Seconds per run-step of `count` runs of `spec` trained together, over `cycles` passes after a warm-up pass."""
    lrs = settings.learning_rates
    runs = [Run(spec, lrs[i % len(lrs)], settings, device, graphs) for i in range(count)]
    generator = torch.Generator(device).manual_seed(1)
    cycle = settings.training_cycle

    def train(passes: int) -> None:
        for step in range(passes * len(cycle)):
            batch = training_batch(settings, cycle[step % len(cycle)], generator)
            failed = step_together(runs, batch, step, settings.warmup_steps)
            if failed:
                raise failed[0][1]

    train(1)
    synchronize(device)
    start = time.perf_counter()
    train(cycles)
    synchronize(device)
    return (time.perf_counter() - start) / (cycles * len(cycle) * count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--protocol", default="based-paper", choices=list(SWEEPS))
    parser.add_argument("--together", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--families", help="only these families (comma-separated)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: eager only, to try the script
    settings, specs = SWEEPS[args.protocol]
    if args.families:
        specs = [spec for spec in specs if spec.family in args.families.split(",")]
    runs_per_model = len(settings.learning_rates)
    result = {
        "environment": environment(device),
        "protocol": args.protocol,
        "settings": dataclasses.asdict(settings),
        "together": args.together,
        "runs_per_model": runs_per_model,
        "models": [],
    }
    modes = MODES if device.type == "cuda" else MODES[:1]
    for spec in specs:  # the results so far are written after each model, so that a run cut short keeps them
        times = {
            mode: run_step_time(
                spec, settings, device, mode != "eager", args.together if mode == "together" else 1, args.cycles
            )
            for mode in modes
        }
        result["models"].append({"model": spec.name, **{f"{mode}_ms": round(1e3 * t, 3) for mode, t in times.items()}})
        print(f"{spec.name}: " + ", ".join(f"{mode} {1e3 * t:.2f}" for mode, t in times.items()) + " ms a run-step")
        result["implied_training_seconds"] = {
            mode: round(sum(m[f"{mode}_ms"] for m in result["models"]) / 1e3 * runs_per_model * settings.max_steps)
            for mode in modes
        }
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        torch.cuda.empty_cache()
    print(f"implied training time of the models timed, in one process, no early stops (s): "
          f"{result['implied_training_seconds']}")  # fmt: skip


if __name__ == "__main__":
    main()
