"""Which layers a converted model's retrieval rests on: each layer's mixer swapped, one at a time, and rescored.

    python benchmarks/recall_layer_swap.py MODEL_DIR --out DIR [--length 256] [--tasks passkey,niah_single]

For every layer of a converted checkpoint (`hf-based convert`), the same weights with that one layer turned from
`hybrid_attention` into `full_attention` (the layer sees every key) or back (a kept softmax layer sees only its window
and sinks), scored on the retrieval tasks at one length (`hf-based eval`'s generated tasks, seed 0, 2 documents per
depth 0/25/50/75/100). A swap needs no training: both mixers read the same q/k/v/o projections; a layer turned hybrid
takes the config's initial window factor, which without a linear term cancels out. CPU or GPU, fp32.
Writes DIR/results.json and DIR/results.md.
"""

import argparse
import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_based import BasedForCausalLM
from hf_based.bench import report
from hf_based.eval import evaluate

DEPTHS = (0, 25, 50, 75, 100)
SWAPPED = {"hybrid_attention": "full_attention", "full_attention": "hybrid_attention"}


def swapped(model, layer: int):
    """`model` with layer `layer`'s mixer swapped (SWAPPED), the other weights shared."""
    config = copy.deepcopy(model.config)
    config.mixer_types = list(config.mixer_types)
    config.mixer_types[layer] = SWAPPED[config.mixer_types[layer]]
    other = BasedForCausalLM(config).to(model.device).eval()
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    if any("window_factors" not in name for name in missing + unexpected):
        raise ValueError(f"layer {layer}: weights that do not carry over: {missing + unexpected}")
    return other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a converted checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--length", type=int, default=256, help="prompt length in tokens")
    parser.add_argument("--tasks", default="passkey,niah_single")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32)
    model = model.to(device).eval()
    tasks = args.tasks.split(",")
    metadata = {"max_seq_lengths": [args.length], "depths": list(DEPTHS), "num_samples": 2, "seed": 0}

    def score(candidate) -> dict[str, float]:
        scores = evaluate(candidate, tasks, tokenizer=tokenizer, batch_size=10, metadata=metadata)
        return {task: scores[task][str(args.length)] for task in tasks}

    results = {"environment": report.environment(device), "model": Path(args.model).name, "length": args.length}
    results["as converted"] = score(model)
    results["swaps"] = []
    for layer, mixer in enumerate(model.config.mixer_types):
        if mixer in SWAPPED:
            entry = {"layer": layer, "from": mixer, "to": SWAPPED[mixer], **score(swapped(model, layer))}
            results["swaps"].append(entry)
            print(entry, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", results)
    rows = [["as converted", "", *(f"{results['as converted'][t]:.1f}" for t in tasks)]]
    rows += [[str(s["layer"]), f"{s['from']} -> {s['to']}", *(f"{s[t]:.1f}" for t in tasks)] for s in results["swaps"]]
    table = report.markdown_table(["layer", "swap", *tasks], rows)
    title = f"# Retrieval at {args.length} tokens with one layer swapped: {results['model']}"
    (out / "results.md").write_text(f"{title}\n\n{report.environment_lines(results['environment'])}\n\n{table}\n")


if __name__ == "__main__":
    main()
