"""Plots of retrieval scores: accuracy by prompt length (the model against a base, e.g. its teacher) and, per
model, a prompt length x needle depth heat map, from `evaluate(..., by_depth=True)` results."""

from collections.abc import Mapping
from pathlib import Path

from hf_based.eval import retrieval
from hf_based.utils import pyplot

Results = Mapping[str, Mapping[str, float]]


def _by_length(metrics: Mapping[str, float]) -> dict[int, float]:
    return {int(name): value for name, value in metrics.items() if name.isdigit()}


def _grid(metrics: Mapping[str, float]) -> tuple[list[int], list[int], list[list[float]]]:
    """(lengths, depths, accuracy[depth][length]) of the "LENGTH@DEPTH" metrics (NaN where a cell is missing)."""
    cells = {tuple(map(int, name.split("@"))): value for name, value in metrics.items() if "@" in name}
    lengths, depths = sorted({length for length, _ in cells}), sorted({depth for _, depth in cells})
    return lengths, depths, [[cells.get((length, depth), float("nan")) for length in lengths] for depth in depths]


def plot_retrieval(results: Mapping[str, Results], path: Path) -> bool:
    """One row per retrieval task in the results of each model ({label: results}, the first one's tasks): accuracy by
    length for every model, then each model's length x depth heat map. False (and no file) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    first = next(iter(results.values()))
    tasks = [task for task in first if task in retrieval.TASKS]
    if not tasks:
        raise ValueError(f"no retrieval task to plot among {', '.join(first)}; accepted: {', '.join(retrieval.TASKS)}")
    columns = 1 + len(results)
    fig, axes = plt.subplots(len(tasks), columns, figsize=(4.2 * columns, 3.4 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        lengths = set()
        for label, scores in results.items():
            by_length = _by_length(scores.get(task, {}))
            lengths |= set(by_length)
            row[0].plot(list(by_length), list(by_length.values()), "o-", label=label)
        row[0].set(xscale="log", ylim=(-0.05, 1.05), xlabel="prompt tokens", ylabel="accuracy", title=task)
        row[0].set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)], fontsize=7)
        row[0].minorticks_off()
        row[0].grid(True, alpha=0.3)
        row[0].legend(fontsize=7)
        for ax, (label, scores) in zip(row[1:], results.items()):
            lengths, depths, grid = _grid(scores.get(task, {}))
            if not grid:
                ax.text(0.5, 0.5, "no scores by depth", ha="center", transform=ax.transAxes)
                continue
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths], fontsize=7)
            ax.set(xlabel="prompt tokens", ylabel="needle depth", title=f"{task}: {label}")
            for y, values in enumerate(grid):
                for x, value in enumerate(values):
                    color = "k" if value > 0.6 else "w"  # readable on viridis' light and dark ends
                    ax.text(x, y, f"{value:.1f}", ha="center", va="center", fontsize=7, color=color)
            fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
