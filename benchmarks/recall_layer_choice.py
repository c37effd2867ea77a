"""Which layers `--softmax-layers copy:6` keeps for SmolLM2, measured on two conversions (CPU or GPU, fp32).

    python benchmarks/recall_layer_choice.py --teacher PATH_OR_ID --out FILE.json

The copy criterion on the first 8 packed 1024-token Alpaca sequences (as `recall_recipes.py` trains), measured on
the untrained conversion of each entry of PROBES: `probe` is what `Recipe.selection_probe()` measures on (no sinks,
the linear term at weight 1); `default layers` is the default recipe's own conversion (64 sinks, no linear term).
Writes {probe name: {"layers": [...], "scores": {layer: KL}, "seconds": s}}.
"""

import argparse
import json
import time

import torch

from hf_based.conversion import Recipe, load_teacher
from hf_based.conversion.data import load_training_data
from hf_based.conversion.layer_selection import CALIBRATION_SEQUENCES, copy_scores, top_layers
from hf_based.conversion.linearize import linearize_model
from hf_based.utils import shared_data_dir

BUDGET = dict(softmax_layers="copy:6", window_factor_init=0.9, batch_size=8, seq_len=1024, grad_accum=1)
PROBES = {
    "probe": Recipe(**BUDGET).selection_probe(),
    "default layers": Recipe(**BUDGET).with_softmax_layers(()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, metavar="PATH_OR_ID")
    parser.add_argument("--out", required=True, help="JSON file")
    parser.add_argument("--data", default=shared_data_dir() / "corpora" / "alpaca_5000.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, tokenizer = load_teacher(args.teacher, dtype=torch.float32)
    train, _ = load_training_data([args.data], tokenizer, BUDGET["seq_len"], "alpaca", 200)
    ids = train.input_ids[:CALIBRATION_SEQUENCES]
    results = {}
    for name, recipe in PROBES.items():
        begun = time.perf_counter()
        student = linearize_model(teacher, recipe, device=device)
        scores = copy_scores(teacher.to(device), student, ids, recipe.batch_size)
        layers = top_layers(scores, 6)
        results[name] = {"layers": layers, "scores": scores, "seconds": round(time.perf_counter() - begun)}
        print(name, layers, flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
