"""Kernel launches of a prefill and of a decode step, counted on the CPU: the CUDA path's host code, run for real.

    python benchmarks/count_launches.py --model converted:benchmarks/configs/smollm2-135m-instruct \
        --baseline benchmarks/configs/smollm2-135m-instruct --out FILE.json [--host-time]

A small model's prefill and decode on a GPU are host-bound (see benchmarks/results/bench): what they cost is roughly
the number of kernels launched. This counts them without a GPU. Each model is the given config with its layer
pattern kept (the first `--layers` layers) and tiny widths, in fp16 on the CPU; the BASED ops take their CUDA
(Triton) path, the kernels running under TRITON_INTERPRET=1. Counted: every aten op that launches a kernel on a GPU
(views, empty allocations and other metadata ops excluded) and every Triton launch, for a prefill of `--prompt` tokens
into an empty cache and for the decode step after it. Launches per layer = the count over the layers.

`--host-time`: the Triton launches are counted and skipped instead (not interpreted), and each phase is timed, one
thread, mean of 10 after 2 warm-ups: the host's work of the CUDA path, measured on the CPU. The aten ops still run on
tiny CPU tensors, whose cost stands in for their launches (a few microseconds each, compute included: keep the prompt
short); the Triton launches' own cost is not in it. bf16 (the interpreted counts run in fp16).
"""

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "kernels_triton"))

# No kernel behind them on a GPU (or only an allocation).
METADATA_OPS = {
    "alias", "as_strided", "detach", "empty", "empty_like", "expand", "lift_fresh", "new_empty", "permute",
    "promote_types", "_reshape_alias", "reshape", "scalar_tensor", "select", "slice", "split", "split_with_sizes",
    "squeeze", "t", "transpose", "unbind", "unsqueeze", "_unsafe_view", "view",
}  # fmt: skip


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in METADATA_OPS:
            self.counts[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


def count_triton_launches(counter: LaunchCounter) -> None:
    """Count each interpreted Triton launch, and run it outside the counter (the interpreter's own tensor ops)."""
    from conftest import squeeze_loop_bounds
    from triton.runtime import interpreter

    squeeze_loop_bounds()
    run = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        counter.counts[f"triton.{self.fn.__name__}"] += 1
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = counted


def skip_triton_launches(counter: LaunchCounter) -> None:
    """Count each Triton launch and skip it (for --host-time: the outputs are left as allocated)."""
    from triton.runtime.jit import JITFunction

    def launcher(self, grid):
        def launch(*args, **kwargs):
            counter.counts[f"triton.{self.fn.__name__}"] += 1

        return launch

    JITFunction.__getitem__ = launcher


def tiny(config, layers: int):
    """The config's first `layers` layers at tiny widths (launch counts do not depend on widths)."""
    config.num_hidden_layers = layers
    if hasattr(config, "mixer_types"):
        config.mixer_types = list(config.mixer_types[:layers])
    config.hidden_size, config.intermediate_size, config.vocab_size = 64, 128, 256
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    return config


@torch.no_grad()
def count(model, prompt: int, counter: LaunchCounter, host_time: bool = False) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    phases = {
        "prefill": lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1),
        "decode": lambda: model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True),
    }
    results = {}
    for phase, run in phases.items():
        counter.counts.clear()
        with counter:
            out = run()
        if phase == "prefill":
            cache = out.past_key_values
        total = sum(counter.counts.values())
        results[phase] = {
            "launches": total,
            "per_layer": round(total / model.config.num_hidden_layers, 1),
            "by_op": dict(counter.counts.most_common()),
        }
        if host_time:  # outside the counter, whose dispatch would dominate
            for _ in range(2):
                run()
            start = time.perf_counter()
            for _ in range(10):
                run()
            results[phase]["host_ms"] = round((time.perf_counter() - start) / 10 * 1e3, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="as `hf-based bench --model` (e.g. converted:LLAMA_CONFIG)")
    parser.add_argument("--baseline", help="a Transformer config, as `hf-based bench --baseline`")
    parser.add_argument("--layers", type=int, default=5, help="layers kept from the start of the pattern")
    parser.add_argument("--prompt", type=int, default=300, help="prefill tokens (more than window + sinks)")
    parser.add_argument("--out", required=True, help="JSON file")
    parser.add_argument("--host-time", action="store_true", help="skip the Triton launches and time each phase")
    args = parser.parse_args()
    if not args.host_time:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' modules are imported (at their first call)
    torch.set_num_threads(1)

    import hf_based.kernels.dispatch as dispatch
    from hf_based.bench.throughput import build, load_config
    from hf_based.cli.bench import CONVERTED, converted_config

    dispatch.use_triton = lambda x: True  # the CUDA path on CPU tensors
    counter = LaunchCounter()
    (skip_triton_launches if args.host_time else count_triton_launches)(counter)
    torch.manual_seed(0)
    spec = args.model
    config = (
        converted_config(spec.removeprefix(CONVERTED)) if spec.startswith(CONVERTED) else load_config(spec, "model")
    )
    results = {"model": spec, "layers": args.layers, "prompt": args.prompt}
    results["mixers"] = list(tiny(config, args.layers).mixer_types)
    configs = {"model": config}
    if args.baseline:
        configs["baseline"] = tiny(load_config(args.baseline, "baseline"), args.layers)
    dtype = torch.bfloat16 if args.host_time else torch.float16  # bf16 as on a GPU; the interpreter cannot run it
    results["counts"] = {
        role: count(build(config, dtype, torch.device("cpu")), args.prompt, counter, args.host_time)
        for role, config in configs.items()
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for role, phases in results["counts"].items():
        print(role, {phase: {k: v for k, v in r.items() if k != "by_op"} for phase, r in phases.items()})


if __name__ == "__main__":
    main()
