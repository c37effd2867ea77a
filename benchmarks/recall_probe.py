"""Retrieval of a teacher and of its conversions before any training: where in-context recall is lost.

    python benchmarks/recall_probe.py --teacher PATH_OR_ID --out DIR [--lengths 256,512] [--samples 1]

Scores the teacher and untrained conversions (`linearize_model`: the teacher's weights, fresh feature maps) on the
retrieval tasks with hf-based's lm-eval integration, every layer converted: LoLCATs' recipe (window 64, window
factor 0.1), larger window factors and a wider window. Writes DIR/results.json and DIR/results.md with date, commit and machine.
"""

import argparse
from pathlib import Path

import torch

from hf_based.bench import report
from hf_based.conversion import Recipe, linearize_model, load_teacher
from hf_based.conversion.recipe import LOLCATS
from hf_based.eval import evaluate

# LoLCATs' hybrid layers everywhere (every layer converted, no sinks, the linear term), window and factor varied.
VARIANTS = {
    "window 64, factor 0.1 (LoLCATs)": Recipe(**LOLCATS),
    "window 64, factor 0.9": Recipe(**{**LOLCATS, "window_factor_init": 0.9}),
    "window 64, factor 0.999": Recipe(**{**LOLCATS, "window_factor_init": 0.999}),
    "window 128, factor 0.9": Recipe(**{**LOLCATS, "window": 128, "window_factor_init": 0.9}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", default="passkey,niah_single")
    parser.add_argument("--lengths", default="256,512")
    parser.add_argument("--samples", type=int, default=1, help="per length and depth")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, tokenizer = load_teacher(args.teacher, dtype=torch.float32)
    metadata = {"max_seq_lengths": [int(n) for n in args.lengths.split(",")], "num_samples": args.samples}
    models = {"teacher": teacher} | {name: linearize_model(teacher, recipe) for name, recipe in VARIANTS.items()}
    results = {}
    for name, model in models.items():
        results[name] = evaluate(model, args.tasks, tokenizer=tokenizer, device=str(device), metadata=metadata)
        print(name, results[name], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = report.environment(device)
    report.write_json(
        out / "results.json", {"environment": env, "teacher": args.teacher, "metadata": metadata, "results": results}
    )
    header = ["model"] + [
        f"{task} {length}" for task in args.tasks.split(",") for length in metadata["max_seq_lengths"]
    ]
    rows = [
        [name]
        + [
            f"{scores[task].get(str(length), float('nan')):.2f}"
            for task in args.tasks.split(",")
            for length in metadata["max_seq_lengths"]
        ]
        for name, scores in results.items()
    ]
    (out / "results.md").write_text(
        f"# Recall probe: teacher vs untrained conversions\n\n{report.environment_lines(env)}"
        f"\n\n{report.markdown_table(header, rows)}\n"
    )


if __name__ == "__main__":
    main()
