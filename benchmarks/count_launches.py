"""Kernel launches of a prefill and of a decode step, counted on the CPU: the CUDA path's host code, run for real.

    python benchmarks/count_launches.py --model converted:benchmarks/configs/smollm2-135m-instruct \
        --baseline benchmarks/configs/smollm2-135m-instruct --out FILE.json

A small model's prefill and decode on a GPU are host-bound (see benchmarks/results/bench): what they cost is roughly
the number of kernels launched. This counts them without a GPU. Each model is the given config with its layer
pattern kept (the first `--layers` layers) and tiny widths, in fp16 on the CPU; the BASED ops take their CUDA
(Triton) path, the kernels running under TRITON_INTERPRET=1. Counted: every aten op that launches a kernel on a GPU
(views, empty allocations and other metadata ops excluded) and every Triton launch, for a prefill of `--prompt` tokens
into an empty cache and for the decode step after it. Launches per layer = the count over the layers.
"""

import argparse
import collections
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

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


def tiny(config, layers: int):
    """The config's first `layers` layers at tiny widths (launch counts do not depend on widths)."""
    config.num_hidden_layers = layers
    if hasattr(config, "mixer_types"):
        config.mixer_types = list(config.mixer_types[:layers])
    config.hidden_size, config.intermediate_size, config.vocab_size = 64, 128, 256
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    return config


@torch.no_grad()
def count(model, prompt: int, counter: LaunchCounter) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    results = {}
    for phase in ("prefill", "decode"):
        counter.counts.clear()
        with counter:
            if phase == "prefill":
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            else:
                model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
        total = sum(counter.counts.values())
        results[phase] = {
            "launches": total,
            "per_layer": round(total / model.config.num_hidden_layers, 1),
            "by_op": dict(counter.counts.most_common()),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="as `hf-based bench --model` (e.g. converted:LLAMA_CONFIG)")
    parser.add_argument("--baseline", help="a Transformer config, as `hf-based bench --baseline`")
    parser.add_argument("--layers", type=int, default=5, help="layers kept from the start of the pattern")
    parser.add_argument("--prompt", type=int, default=300, help="prefill tokens (more than window + sinks)")
    parser.add_argument("--out", required=True, help="JSON file")
    args = parser.parse_args()

    import hf_based.kernels.dispatch as dispatch
    from hf_based.bench.throughput import build, load_config
    from hf_based.cli.bench import CONVERTED, converted_config

    dispatch.use_triton = lambda x: True  # the CUDA path on CPU tensors
    counter = LaunchCounter()
    count_triton_launches(counter)
    torch.manual_seed(0)
    spec = args.model
    config = (
        converted_config(spec.removeprefix(CONVERTED)) if spec.startswith(CONVERTED) else load_config(spec, "model")
    )
    results = {"model": spec, "layers": args.layers, "prompt": args.prompt}
    results["mixers"] = list(tiny(config, args.layers).mixer_types)
    results["counts"] = {"model": count(build(config, torch.float16, torch.device("cpu")), args.prompt, counter)}
    if args.baseline:
        baseline = tiny(load_config(args.baseline, "baseline"), args.layers)
        results["counts"]["baseline"] = count(build(baseline, torch.float16, torch.device("cpu")), args.prompt, counter)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for role, phases in results["counts"].items():
        print(role, {phase: (r["launches"], r["per_layer"]) for phase, r in phases.items()})


if __name__ == "__main__":
    main()
