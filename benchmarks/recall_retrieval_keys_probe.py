"""Does a converted layer's retrieval set hold passkey's needle? The default's layers, untrained, on CPU.

    python benchmarks/recall_retrieval_keys_probe.py --teacher PATH_OR_ID --out DIR [--length 1024] [--keys 64,256,2048]

SmolLM2's default conversion without training (softmax layers 0, 17-20, 23; 64 sinks; no linear term), fp32. For
passkey documents at `--length` tokens and depths 25/50/75 (the retrieval task's own generator, seed 0) and each
value R of `--keys`: the greedy answer (8 new tokens), and per converted layer how many of the needle sentence's
tokens its R retrieval slots took. DIR/results.json and DIR/results.md, with date, commit and machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("hf_based") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from hf_based.bench import report  # noqa: E402
from hf_based.conversion import Recipe, convert, load_teacher  # noqa: E402
from hf_based.conversion.recipe import LOLCATS  # noqa: E402
from hf_based.eval.retrieval import passkey_doc  # noqa: E402
from hf_based.modeling.cache import BasedHybridLayer  # noqa: E402
from hf_based.utils import shared_data_dir  # noqa: E402

DEPTHS = (25, 50, 75)
RECIPE = dict(
    softmax_layers=(0, 17, 18, 19, 20, 23),
    window_factor_init=0.9,
    linear_factor_init=0,
    sinks=64,
    stage1_steps=0,
    stage2_steps=0,
)


def needle_positions(tokenizer, prompt: str, key: str) -> set[int]:
    """Token positions of the needle sentence (its first 60 characters from "The pass key is KEY")."""
    start = prompt.index(f"The pass key is {key}")
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    return {i for i, (first, _) in enumerate(offsets) if start <= first < start + 60}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, metavar="PATH_OR_ID")
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--keys", default="64,256,2048", help="retrieval keys per layer, comma-separated")
    args = parser.parse_args(argv)
    teacher, tokenizer = load_teacher(args.teacher, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as work:
        model = convert(
            out=Path(work) / "converted",
            recipe=Recipe(**(LOLCATS | RECIPE)),
            teacher=teacher,
            tokenizer=tokenizer,
            base_name=Path(args.teacher).name,
            data=shared_data_dir() / "corpora" / "alpaca_5000.json",
            dtype=torch.float32,
            progress=False,
        ).model.eval()
    layers = [i for i, mixer in enumerate(model.config.mixer_types) if mixer == "hybrid_attention"]
    taken = []  # per _choose call (one per converted layer and prefill): the positions row 0 took
    choose = BasedHybridLayer._choose

    def recording(self, *args):
        choice = choose(self, *args)
        taken.append(set(choice[2][0].nonzero()[:, 0].tolist()))
        return choice

    BasedHybridLayer._choose = recording
    rows = []
    for keys in (int(n) for n in args.keys.split(",")):
        model.config.hybrid_retrieval_keys = keys
        for depth in DEPTHS:
            doc = passkey_doc(tokenizer, args.length, depth, 0)
            ids = tokenizer(doc["input"], return_tensors="pt").input_ids
            taken.clear()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=8, do_sample=False)
            answer = tokenizer.decode(out[0, ids.shape[1] :])
            needle = needle_positions(tokenizer, doc["input"], doc["outputs"][0])
            held = {layer: len(needle & chosen) for layer, chosen in zip(layers, taken)}
            rows.append(
                dict(
                    keys=keys,
                    depth=depth,
                    key=doc["outputs"][0],
                    answer=answer,
                    correct=doc["outputs"][0] in answer,
                    needle_tokens=len(needle),
                    held_by_layer=held,
                )
            )
            print(rows[-1], flush=True)
    results = {"environment": report.environment(torch.device("cpu")), "length": args.length, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", results)
    header = ["retrieval keys", "depth", "answered", "needle tokens held per converted layer (min / median / max)"]
    table = []
    for row in rows:
        held = sorted(row["held_by_layer"].values())
        table.append(
            [
                str(row["keys"]),
                str(row["depth"]),
                "yes" if row["correct"] else f"no: {row['answer']!r}",
                f"{held[0]} / {held[len(held) // 2]} / {held[-1]} of {row['needle_tokens']}",
            ]
        )
    lines = [
        f"# Passkey's needle in the retrieval slots: untrained default conversion, {args.length} tokens",
        "",
        report.environment_lines(results["environment"]),
        "",
        report.markdown_table(header, table),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
