"""Plots of the recall runs of recall_recipes.py: retrieval vs prompt length, and the softmax-layer Pareto series.

    python benchmarks/plot_recall.py RESULTS.json [...] --out DIR

DIR/recall_by_length.png: passkey and niah_single accuracy vs prompt length for the teacher and the `--models`;
DIR/recall_pareto.png: the "copy:K factor 0.5" series vs K, with niah_single at the shortest and longest measured
lengths, LAMBADA perplexity over the teacher's and the cache after 8192 tokens. Each model comes from the first file
that has it.
"""

import argparse
import json
import re
from pathlib import Path

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


def pareto(plt, files: list[dict], path: Path) -> None:
    series, teacher = {}, None
    for results in files:
        if "cache_mib" in results["models"].get("teacher", {}):
            teacher = results["models"]["teacher"]
        for name, entry in results["models"].items():
            match = re.fullmatch(r"copy:(\d+) factor 0\.5", name)
            if match and "retrieval" in entry:
                series.setdefault(int(match.group(1)), entry)
    ks = sorted(series)
    niah = {k: series[k]["retrieval"]["niah_single"] for k in ks}
    lengths = sorted(set.intersection(*(set(scores) for scores in niah.values())), key=int)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for length in (lengths[0], lengths[-1]):
        (line,) = axes[0].plot(ks, [niah[k][length] for k in ks], marker="o", label=f"converted, {length} tokens")
        teacher_score = teacher["retrieval"]["niah_single"][length]
        axes[0].axhline(teacher_score, linestyle="--", color=line.get_color(), label=f"teacher, {length} tokens")
    axes[0].set(xlabel="softmax layers kept (of 30)", ylabel="niah_single accuracy", ylim=(-0.05, 1.05))
    axes[0].legend(fontsize=7)
    base = teacher["lambada"]["perplexity"]
    axes[1].plot(ks, [series[k]["lambada"]["perplexity"] / base for k in ks], marker="o")
    axes[1].axhline(1.5, linestyle="--", color="gray", label="target 1.5x")
    axes[1].set(xlabel="softmax layers kept (of 30)", ylabel="LAMBADA perplexity / teacher's")
    axes[1].legend(fontsize=7)
    axes[2].plot(ks, [series[k]["cache_mib"] for k in ks], marker="o", label="converted")
    axes[2].axhline(teacher["cache_mib"], linestyle="--", color="black", label="teacher (KV cache)")
    axes[2].set(xlabel="softmax layers kept (of 30)", ylabel="cache after 8192 tokens (MiB, one sequence)")
    axes[2].legend(fontsize=7)
    fig.suptitle("copy:K selection, window factor 0.5: recall, perplexity and cache vs K")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files of recall_recipes.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=",".join(BY_LENGTH), help="models of recall_by_length.png, in order")
    args = parser.parse_args()
    files = [json.loads(Path(f).read_text()) for f in args.results]
    out = Path(args.out)
    plt = pyplot()
    by_length(plt, files, args.models.split(","), out / "recall_by_length.png")
    pareto(plt, files, out / "recall_pareto.png")


if __name__ == "__main__":
    main()
