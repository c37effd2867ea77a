"""What makes passkey harder than niah_single for a converted model: their haystacks and needles crossed.

    python benchmarks/recall_passkey_factors.py MODEL_DIR --teacher PATH_OR_ID --out DIR [--length 256]

`hf-based eval`'s passkey hides a key in a repeated paragraph and asks for "the pass key"; niah_single hides a number
among varied sentences and asks for it by a random name that only the needle holds. Here each needle (passkey's,
niah's, and passkey's with a header that does not mention the key) goes into each haystack (the repeated paragraph,
varied sentences), at depths 0/25/50/75/100, 2 prompts each (seeded, not the tasks' own documents), and the model and
its teacher answer greedily (12 new tokens; correct if the answer appears). CPU or GPU, fp32.
Writes DIR/results.json and DIR/results.md.
"""

import argparse
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_based.bench import report
from hf_based.conversion import load_teacher
from hf_based.eval import retrieval

DEPTHS = (0, 25, 50, 75, 100)
NEUTRAL_HEADER = "Some text is given below. Read all of it with care.\n\n"
NEEDLES = {
    "passkey": retrieval.passkey_needle,
    "passkey, neutral header": lambda rng: {**retrieval.passkey_needle(rng), "header": NEUTRAL_HEADER},
    "niah_single": retrieval.niah_needles,
}


def haystacks(length: int) -> dict:
    return {
        "repeated paragraph (passkey's)": lambda rng: list(retrieval.PASSKEY_PARAGRAPH) * (length // 4),
        "varied sentences (niah's)": lambda rng: retrieval.filler_sentences(rng, length),
    }


@torch.no_grad()
def accuracy(model, tokenizer, docs: list[dict]) -> float:
    hits = 0
    for doc in docs:
        ids = tokenizer(doc["input"], return_tensors="pt").input_ids.to(model.device)
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        hits += doc["outputs"][0] in tokenizer.decode(out[0, ids.shape[1] :])
    return hits / len(docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a converted checkpoint directory")
    parser.add_argument("--teacher", required=True, metavar="PATH_OR_ID")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--length", type=int, default=256, help="prompt length in tokens")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    models = {
        "converted": AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32),
        "teacher": load_teacher(args.teacher, dtype=torch.float32)[0],
    }
    results = {"environment": report.environment(device), "model": Path(args.model).name, "length": args.length}
    rows = []
    for haystack, sentences in haystacks(args.length).items():
        for needle, make in NEEDLES.items():
            docs = []
            for depth in DEPTHS:
                for sample in range(2):
                    rng = random.Random(f"factors/{haystack}/{needle}/{depth}/{sample}")
                    fields = make(rng)
                    docs.append(
                        retrieval._haystack_doc(tokenizer, args.length, depth, rng, sentences=sentences(rng), **fields)
                    )
            scores = {name: accuracy(model.to(device).eval(), tokenizer, docs) for name, model in models.items()}
            results.setdefault("cells", []).append({"haystack": haystack, "needle": needle, **scores})
            rows.append([haystack, needle, f"{scores['converted']:.1f}", f"{scores['teacher']:.1f}"])
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", results)
    table = report.markdown_table(["haystack", "needle", "converted", "teacher"], rows)
    title = f"# Passkey's and niah_single's haystacks and needles crossed, {args.length} tokens: {results['model']}"
    (out / "results.md").write_text(f"{title}\n\n{report.environment_lines(results['environment'])}\n\n{table}\n")


if __name__ == "__main__":
    main()
