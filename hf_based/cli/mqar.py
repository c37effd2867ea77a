"""`hf-based mqar --out DIR`: the MQAR recall-vs-state-size sweep, resumable by run, in one process or several."""

import argparse
import dataclasses
import os
import subprocess
import sys
import time

from hf_based.bench.mqar_sweeps import FAMILIES, SWEEPS, settings_from_dict
from hf_based.cli.common import device as command_device
from hf_based.cli.common import output_directory, redraw
from hf_based.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="directory for results.jsonl/.json/.md and mqar.png"
    )
    parser.add_argument(
        "--protocol",
        choices=list(SWEEPS),
        default="quick",
        help="sweep: 'quick' (23 models, one learning rate, under 8 min on one H200), 'based-paper' (the BASED "
        "paper's Figure 2: its training mix and test lengths up to 1024 x 256, 22 models, the best of 4 learning "
        "rates, up to 22,500 steps each) or 'tiny' (2 models, for CPUs)",
    )
    parser.add_argument("--families", metavar="A,B", help=f"only these model families ({', '.join(FAMILIES)})")
    parser.add_argument("--max-steps", type=int, help="training steps per run at most")
    parser.add_argument("--batch-size", type=int, help="training batch size")
    parser.add_argument("--lr", type=float, help="one peak learning rate instead of the protocol's")
    parser.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="wall-clock budget of the whole sweep, shared by the runs (0: none, max-steps per run); "
        "default: 400 for the quick sweep on CUDA, none otherwise",
    )
    parser.add_argument("--seed", type=int, help="seed of the weights and the data (default 0)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--eager",
        action="store_true",
        help="run every training step eagerly (on CUDA the steps are replayed from CUDA graphs by default)",
    )
    parser.add_argument("--plot-only", action="store_true", help="only redraw mqar.png and results.md from DIR")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="train this many runs at once, each in its own process on the device (small models leave a GPU mostly "
        "idle); default 1",
    )
    parser.add_argument(
        "--together",
        type=int,
        default=1,
        help="train this many runs at once in each process, on the same batches (on CUDA each on its own stream, "
        "so that their small kernels overlap); default 1",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # I/N: one worker's share, as --workers starts it
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# The options a worker process gets from the command that starts it.
WORKER_OPTIONS = (
    "out",
    "protocol",
    "families",
    "max_steps",
    "batch_size",
    "lr",
    "time_budget",
    "seed",
    "device",
    "eager",
    "together",
)


def run_workers(args: argparse.Namespace) -> None:
    """--workers N: N processes of this command, each with --worker I/N, and their threads split between them."""
    options = {name: getattr(args, name) for name in WORKER_OPTIONS}
    argv = [
        f"--{name.replace('_', '-')}" + ("" if value is True else f"={value}")
        for name, value in options.items()
        if value is not None and value is not False
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "hf_based", "mqar", *argv, "--quiet", f"--worker={i}/{args.workers}"], env=env
        )
        for i in range(args.workers)
    ]
    failed = [i for i, worker in enumerate(workers) if worker.wait() != 0]
    if failed:
        print(f"hf-based mqar: worker(s) {', '.join(map(str, failed))} failed; the report shows the runs they finished")


def run(args: argparse.Namespace) -> None:
    from hf_based.bench.mqar import collect_runs, run_sweep, write_report
    from hf_based.bench.report import environment, machine

    out, results = output_directory(args.out, args.plot_only, "run the sweep first")
    if results is not None:
        redraw(
            results,
            lambda saved: write_report(saved["runs"], settings_from_dict(saved["settings"]), out, saved["environment"]),
            "mqar",
        )
        print(f"hf-based mqar: redrew {out / 'mqar.png'} and {out / 'results.md'}")
        return
    device = command_device(args.device)
    settings, specs = SWEEPS[args.protocol]
    overrides = {
        name: value
        for name, value in (
            ("max_steps", args.max_steps),
            ("batch_size", args.batch_size),
            ("lr", args.lr),
            ("lrs", None if args.lr is None else ()),
            ("seed", args.seed),
        )
        if value is not None
    }
    if args.time_budget is not None:
        overrides["time_budget_s"] = args.time_budget or None
    elif device.type != "cuda":
        overrides["time_budget_s"] = None  # the default budget is sized for an H200
    try:
        settings = dataclasses.replace(settings, **overrides)
    except ValueError as error:
        raise UsageError(str(error)) from error
    if args.families:
        wanted = [f.strip() for f in args.families.split(",") if f.strip()]
        unknown = [f for f in wanted if f not in FAMILIES]
        if unknown or not wanted:
            raise UsageError(
                f"--families {args.families!r}: unknown family {', '.join(unknown) or '(none given)'}; "
                f"accepted: {', '.join(FAMILIES)}"
            )
        specs = [spec for spec in specs if spec.family in wanted]
        if not specs:
            raise UsageError(
                f"--families {args.families!r}: the {args.protocol!r} sweep has no model of these families"
            )
    for name in ("workers", "together"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)}: accepted: an integer >= 1")
    graphs = False if args.eager else None  # None: on CUDA
    start = time.perf_counter()
    if args.worker is not None:  # one share of a --workers run: the command that started it writes the report
        index, count = (int(part) for part in args.worker.split("/"))
        run_sweep(settings, specs, out, device, False, (index, count), graphs, args.together)
        return
    if args.workers > 1:
        run_workers(args)
        runs = collect_runs(settings, specs, out)
    else:
        runs = run_sweep(settings, specs, out, device, not args.quiet, graphs=graphs, together=args.together)
    write_report(runs, settings, out, environment(device))
    headline = settings.headline.name
    print(
        f"hf-based mqar: {len(runs)} runs in {time.perf_counter() - start:.0f} s on {machine(device)} "
        f"-> {out}/results.json, results.md, mqar.png"
    )
    for run in runs:
        if "error" in run:
            print(f"  FAILED {run['name']}: {run['error']}")
    for family in FAMILIES:
        members = [r for r in runs if r["family"] == family and "error" not in r]
        if members:
            best = max(members, key=lambda r: r["accuracy"][headline])
            print(
                f"  {family:>15}: best {headline} accuracy {best['accuracy'][headline]:.3f} ({best['name']}, "
                f"state {best['state_size'][headline]:,})"
            )
