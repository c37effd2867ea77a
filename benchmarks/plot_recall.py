"""Plots of the recall runs of recall_recipes.py: retrieval vs prompt length, and the softmax-layer Pareto series.

    python benchmarks/plot_recall.py RESULTS.json [...] --out DIR

DIR/recall_by_length.png: passkey and niah_single accuracy vs prompt length for the teacher and the `--models`;
DIR/recall_pareto.png: the series named by `--pareto` (default "copy:K factor 0.5") vs K, with passkey and
niah_single at the shortest and longest measured lengths, LAMBADA perplexity and the zero-shot average (where
scored) over the teacher's, the cache after 8192 tokens and, with `--speed K=BENCH.json ...` (`hf-based bench --softmax-layers K` results), decode tokens/s. Each model
comes from the first file that has it.
"""

import argparse
import json
import re
from pathlib import Path

from recall_recipes import zero_shot_average  # this directory: a sibling script

from hf_based.utils import pyplot

TASKS = ("passkey", "niah_single")
BY_LENGTH = ("teacher", "hybrid (LoLCATs)", "kl:6", "copy:6", "copy:6 factor 0.5", "copy:6 factor 0.9")


def by_length(plt, files: list[dict], names: list[str], path: Path) -> None:
    entries = {}  # each model from the first file that has it
    for results in files:
        for name, entry in results["models"].items():
            if name in names and "retrieval" in entry:
                entries.setdefault(name, entry)
    fig, axes = plt.subplots(1, len(TASKS), figsize=(11, 4), sharey=True)
    for ax, task in zip(axes, TASKS):
        for name in [name for name in names if name in entries]:
            entry = entries[name]
            scores = entry["retrieval"][task]
            lengths = sorted(scores, key=int)
            style = dict(color="black", linewidth=2.5) if name == "teacher" else {}
            ax.plot([int(n) for n in lengths], [scores[n] for n in lengths], marker="o", label=name, **style)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(task)
        ax.set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct and its conversions ({files[0]['environment']['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def pareto(plt, files: list[dict], pattern: str, speeds: dict[int, dict], path: Path) -> None:
    """The series whose names match `pattern` (K = its first group) vs K: retrieval at the shortest and longest
    lengths all of them measured, LAMBADA perplexity and the zero-shot average over the teacher's, the cache after
    8192 tokens, and, with `speeds` (K -> a bench results.json), decode tokens/s at the bench's largest batch against
    the teacher's."""
    series, teacher = {}, None
    for results in files:
        if "cache_mib" in results["models"].get("teacher", {}):
            teacher = teacher or results["models"]["teacher"]
        for name, entry in results["models"].items():
            match = re.fullmatch(pattern, name)
            if match and "retrieval" in entry:
                series.setdefault(int(match.group(1)), entry)
    ks = sorted(series)
    lengths = sorted(set.intersection(*(set(series[k]["retrieval"]["niah_single"]) for k in ks)), key=int)
    panels = 4 if speeds else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.3 * panels, 4))
    for task, marker in zip(TASKS, ("s", "o")):
        for length in (lengths[0], lengths[-1]):
            scores = [series[k]["retrieval"][task][length] for k in ks]
            (line,) = axes[0].plot(ks, scores, marker=marker, label=f"{task}, {length} tokens")
            teacher_score = teacher["retrieval"][task][length]
            axes[0].axhline(teacher_score, linestyle="--", color=line.get_color(), linewidth=0.8)
    axes[0].set(xlabel="softmax layers kept (of 30)", ylabel="accuracy (dashed: teacher)", ylim=(-0.05, 1.05))
    axes[0].legend(fontsize=7)
    base = teacher["lambada"]["perplexity"]
    axes[1].plot(ks, [series[k]["lambada"]["perplexity"] / base for k in ks], marker="o", label="LAMBADA perplexity")
    if all("zero_shot" in series[k] for k in ks) and "zero_shot" in teacher:
        average = zero_shot_average(teacher)
        ratios = [zero_shot_average(series[k]) / average for k in ks]
        axes[1].plot(ks, ratios, marker="s", label="zero-shot average accuracy")
        axes[1].axhline(0.99, linestyle=":", color="gray", label="target 0.99x (zero-shot)")
    axes[1].axhline(1.5, linestyle="--", color="gray", label="target 1.5x (perplexity)")
    axes[1].set(xlabel="softmax layers kept (of 30)", ylabel="ratio to the teacher's")
    axes[1].legend(fontsize=7)
    axes[2].plot(ks, [series[k]["cache_mib"] for k in ks], marker="o", label="converted")
    axes[2].axhline(teacher["cache_mib"], linestyle="--", color="black", label="teacher (KV cache)")
    axes[2].set(xlabel="softmax layers kept (of 30)", ylabel="cache after 8192 tokens (MiB, one sequence)")
    axes[2].legend(fontsize=7)
    if speeds:
        rates = {k: decode_rates(bench) for k, bench in speeds.items()}
        batch, prompt = max(next(iter(rates.values())))
        axes[3].plot(sorted(rates), [rates[k][batch, prompt][0] for k in sorted(rates)], marker="o", label="converted")
        axes[3].plot(sorted(rates), [rates[k][batch, prompt][1] for k in sorted(rates)], "k--", label="teacher")
        axes[3].set(xlabel="softmax layers kept (of 30)", ylabel=f"decode tokens/s, batch {batch} after {prompt}")
        axes[3].legend(fontsize=7)
    series_name = pattern.replace(r"(\d+)", "K").replace("\\", "")
    fig.suptitle(f"{series_name}: recall, perplexity, cache{' and decode speed' if speeds else ''} vs K")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def decode_rates(bench: dict) -> dict[tuple[int, int], tuple[float, float]]:
    """(batch, prompt) -> (converted, teacher) decode tokens/s of one `hf-based bench` results.json."""
    rows = {}
    for row in bench["decode"]:
        if row["status"] == "ok":
            rows.setdefault((row["batch"], row["prompt_len"]), {})[row["model"]] = row["tokens_per_s"]
    return {key: (pair["model"], pair["baseline"]) for key, pair in rows.items() if len(pair) == 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files of recall_recipes.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=",".join(BY_LENGTH), help="models of recall_by_length.png, in order")
    parser.add_argument(
        "--pareto", default=r"copy:(\d+) factor 0\.5", help="regex of the Pareto series' names; its group is K"
    )
    parser.add_argument(
        "--speed", nargs="*", default=[], metavar="K=BENCH.json", help="hf-based bench results with K softmax layers"
    )
    args = parser.parse_args()
    files = [json.loads(Path(f).read_text()) for f in args.results]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    by_length(plt, files, args.models.split(","), out / "recall_by_length.png")
    speeds = {int(k): json.loads(Path(f).read_text()) for k, f in (spec.split("=", 1) for spec in args.speed)}
    pareto(plt, files, args.pareto, speeds, out / "recall_pareto.png")


if __name__ == "__main__":
    main()
