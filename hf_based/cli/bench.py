"""`hf-based bench --out DIR`: prefill and decode throughput of a BASED-family model against a Transformer."""

import argparse
import dataclasses

from hf_based.cli.common import device as command_device
from hf_based.cli.common import int_list, output_directory, redraw
from hf_based.errors import UsageError
from hf_based.modeling.presets import PRESETS

CONVERTED = "converted:"


def converted_config(base: str, softmax_layers: int | None = None):
    """The BasedConfig of `base` (a Llama-family config) converted with the default recipe, whose softmax layers,
    chosen from the weights in a real conversion, are here evenly spaced: speed depends on how many, not which.
    `softmax_layers`: how many (default: the recipe's share)."""
    from hf_based import checkpoints
    from hf_based.conversion.linearize import based_config
    from hf_based.conversion.recipe import Recipe

    teacher = checkpoints.load_config(base)
    recipe, layers = Recipe(), teacher.num_hidden_layers
    count = recipe.layer_selection.size(layers) if softmax_layers is None else softmax_layers
    if not 0 <= count <= layers:
        raise UsageError(f"--softmax-layers {count} is not supported; accepted: 0 to {layers} (the teacher's layers)")
    return based_config(teacher, recipe.with_softmax_layers([int((i + 0.5) * layers / count) for i in range(count)]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for results.json/.md and bench.png")
    parser.add_argument(
        "--model",
        metavar="PRESET_OR_PATH",
        help=f"BASED-family model: a preset ({', '.join(PRESETS)}) or a checkpoint directory / hub id "
        f"(only its config is read; weights are random), or {CONVERTED}LLAMA: what `hf-based convert` makes of that "
        "Llama-family directory / hub id / .gguf with the default recipe's share of softmax layers, evenly spaced "
        "(default: based-360m, tiny with --tiny)",
    )
    parser.add_argument(
        "--softmax-layers",
        type=int,
        metavar="K",
        help=f"with {CONVERTED}LLAMA: how many layers stay softmax attention (default: the recipe's share)",
    )
    parser.add_argument(
        "--baseline",
        default="llama",
        metavar="llama|PATH",
        help="'llama' (matched to --model) or a Transformer checkpoint directory / hub id / .gguf file "
        "(config only) (default: llama)",
    )
    parser.add_argument("--prefill-lengths", type=int_list, metavar="N,N", help="prompt lengths for prefill")
    parser.add_argument("--prefill-batch", type=int, help="batch size for prefill (default 1)")
    parser.add_argument("--decode-batches", type=int_list, metavar="B,B", help="batch sizes for decode")
    parser.add_argument("--prompt-lengths", type=int_list, metavar="P,P", help="prompt lengths before decode")
    parser.add_argument("--steps", type=int, help="decode steps per timed trial (default 32)")
    parser.add_argument("--trials", type=int, help="timed trials per decode point (default 3)")
    parser.add_argument(
        "--generate-batches", type=int_list, metavar="B,B", help="batch sizes for end-to-end generate() (default 1,64)"
    )
    parser.add_argument("--generate-prompt", type=int, metavar="P", help="prompt length for generate() (default 2048)")
    parser.add_argument("--new-tokens", type=int, metavar="N", help="tokens generate() adds per sequence (default 128)")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="weights and activations (default bfloat16; float32 with --tiny)",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true", help="time eager decode steps")
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes (CPU tests)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--plot-only", action="store_true", help="only redraw bench.png and results.md from DIR")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


def run(args: argparse.Namespace) -> None:
    from hf_based.bench.report import machine
    from hf_based.bench.throughput import TINY, BenchSettings, resolve_configs, run_bench, write_report

    out, results = output_directory(args.out, args.plot_only, "run the benchmark first")
    if results is not None:
        redraw(results, lambda saved: write_report(saved, out), "bench")
        print(f"hf-based bench: redrew {out / 'bench.png'} and {out / 'results.md'}")
        return
    device = command_device(args.device)
    settings = TINY if args.tiny else BenchSettings()
    overrides = {
        name: value
        for name, value in (
            ("prefill_lengths", args.prefill_lengths),
            ("prefill_batch", args.prefill_batch),
            ("decode_batches", args.decode_batches),
            ("prompt_lengths", args.prompt_lengths),
            ("steps", args.steps),
            ("trials", args.trials),
            ("generate_batches", args.generate_batches),
            ("generate_prompt_len", args.generate_prompt),
            ("generate_new_tokens", args.new_tokens),
            ("dtype", args.dtype),
        )
        if value is not None
    }
    if args.no_cuda_graphs:
        overrides["cuda_graphs"] = False
    model = args.model or ("tiny" if args.tiny else "based-360m")
    if args.softmax_layers is not None and not model.startswith(CONVERTED):
        raise UsageError(f"--softmax-layers needs --model {CONVERTED}LLAMA; got --model {model}")
    model_config = None
    if model.startswith(CONVERTED):
        model_config = converted_config(model.removeprefix(CONVERTED), args.softmax_layers)
    try:
        settings = dataclasses.replace(settings, **overrides)
        resolve_configs(model, args.baseline, model_config)  # bad input fails here, before any model is built
    except ValueError as error:
        raise UsageError(str(error)) from error
    results = run_bench(model, args.baseline, settings, device, not args.quiet, model_config)
    write_report(results, out)
    summary = results["summary"]
    print(
        f"hf-based bench: {results['models']['model']['name']} vs {results['models']['baseline']['name']} on "
        f"{machine(device)} -> {out}/results.json, results.md, bench.png"
    )
    print(f"  prefill speedup by length: {summary['prefill_speedup']}")
    print(f"  decode speedup by (prompt, batch): {summary['decode_speedup']}")
    print(f"  generate() speedup by (prompt, batch), fastest cache of each: {summary['generate_speedup']}")
    for key in ("decode_target", "prefill_target"):
        if key in summary:
            target = summary[key]
            print(
                f"  {key}: >= {target['speedup']}x, measured {target['measured']} -> "
                f"{'met' if target['met'] else 'NOT met'}"
            )
