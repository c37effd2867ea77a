"""How a converted layer should choose its retrieval keys: rules compared on whether they keep a needle's answer.

    python benchmarks/recall_key_choice_probe.py --teacher PATH_OR_ID --out DIR [--length 4096] [--seeds 0,1] \
        [--slots 256,512]

SmolLM2's default conversion without training (softmax layers 0, 17-20, 23; 64 sinks; no linear term; 256 retrieval
keys), fp32, on passkey and niah_single documents (the retrieval tasks' generators at `--length` tokens, depths
25/50/75, `--seeds`: tuning seeds, below the held-out 1000). For each converted layer and document, the attention of
the prompt's last 64 queries is recorded once (in a forward that chooses as the default does); each rule then scores
the keys from it (which queries, summed or the best per key, the neighbours a scoring key brings), takes the R best
(`--slots`) of those the slots may hold (not sinks, older than the window) and counts the layers that hold every
token of the answer. A proxy, not generation: it says which rule to try end to end. DIR/results.json and
DIR/results.md, with date, commit and machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("hf_based") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from hf_based.bench import report  # noqa: E402
from hf_based.conversion import Recipe, linearize_model, load_teacher  # noqa: E402
from hf_based.eval.retrieval import niah_single_doc, passkey_doc  # noqa: E402
from hf_based.kernels.retrieval import reference as retrieval  # noqa: E402
from hf_based.kernels.softmax.reference import visible_keys  # noqa: E402
from hf_based.modeling import modeling_based  # noqa: E402

DEPTHS = (25, 50, 75)
TASKS = {"passkey": passkey_doc, "niah_single": niah_single_doc}
RECIPE = dict(softmax_layers=(0, 17, 18, 19, 20, 23), linear_factor_init=0, sinks=64, retrieval_keys=256)
RECORDED_QUERIES = 64
# name -> (last queries observed, how their weights combine per key, keys kept before / after a scoring one)
RULES = {
    "last 64, sum, 3 / 3": (64, "sum", 3, 3),
    "last 64, sum, 3 / 11": (64, "sum", 3, 11),
    "last 16, sum, 3 / 11": (16, "sum", 3, 11),
    "last 8, sum, 3 / 11": (8, "sum", 3, 11),
    "last 32, best, 3 / 11": (32, "best", 3, 11),
    "last 16, best, 3 / 11": (16, "best", 3, 11),
    "last 8, best, 3 / 11": (8, "best", 3, 11),
}
DEFAULT = (retrieval.RETRIEVAL_QUERIES, "best", retrieval.KEPT_BEFORE, retrieval.KEPT_AFTER)


def attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[H, n, Tk] fp64 softmax weights of the queries q [1, n, H, D] (the last n positions) over the keys [1, Tk, Hkv, D]."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q.double(), k.double())[0] * q.shape[-1] ** -0.5
    return logits.masked_fill(~visible_keys(q.shape[1], k.shape[1], None, None, q.device), -torch.inf).softmax(-1)


def chosen(weights: torch.Tensor, rule: tuple, sinks: int, window: int, slots: int) -> torch.Tensor:
    """[Tk] bool: the keys the retrieval slots take under `rule`."""
    queries, combine, before, after = rule
    recent = weights[:, -queries:]
    score = recent.sum((0, 1)) if combine == "sum" else recent.amax(1).sum(0)
    score = retrieval.pool_neighbours(score[None], before, after)[0]
    score[:sinks] = score[score.shape[0] - window + 1 :] = -1  # sinks and the window are not the slots'
    taken = torch.zeros_like(score, dtype=torch.bool)
    taken[score.topk(slots).indices] = True
    return taken


def answer_positions(tokenizer, prompt: str, answer: str) -> list[int]:
    start = prompt.index(answer)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (first, last) in enumerate(offsets) if first < start + len(answer) and last > start]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, metavar="PATH_OR_ID")
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--seeds", default="0,1", help="document seeds, comma-separated (held-out ones start at 1000)")
    parser.add_argument("--slots", default="256", help="retrieval keys per layer (R), comma-separated")
    args = parser.parse_args(argv)
    all_slots = [int(n) for n in args.slots.split(",")]
    teacher, tokenizer = load_teacher(args.teacher, dtype=torch.float32)
    model = linearize_model(teacher, Recipe(**RECIPE)).eval()
    config = model.config
    recorded = []  # per converted layer of one prefill: (q, k)
    scores = modeling_based.retrieval_scores

    def recording(q, k, key_mask):  # the forward itself keeps the default's choice
        recorded.append((q, k))
        return scores(q[:, -retrieval.RETRIEVAL_QUERIES :], k, key_mask)

    modeling_based.retrieval_scores, modeling_based.RETRIEVAL_QUERIES = recording, RECORDED_QUERIES
    rows = []
    for task, make in TASKS.items():
        for depth in DEPTHS:
            for seed in (int(s) for s in args.seeds.split(",")):
                doc = make(tokenizer, args.length, depth, seed)
                ids = tokenizer(doc["input"], return_tensors="pt").input_ids
                recorded.clear()
                with torch.no_grad():
                    model(input_ids=ids, use_cache=True, logits_to_keep=1)
                answer = answer_positions(tokenizer, doc["input"], doc["outputs"][0])
                held = {(name, slots): 0 for name in RULES for slots in all_slots}
                for q, k in recorded:
                    weights = attention(q, k)
                    for (name, slots), count in held.items():
                        rule = RULES[name]
                        taken = chosen(weights, rule, config.hybrid_attention_sinks, config.sliding_window, slots)
                        held[name, slots] = count + bool(taken[answer].all())
                held = {f"{name}, R {slots}": count for (name, slots), count in held.items()}
                rows.append(dict(task=task, depth=depth, seed=seed, layers=len(recorded), held=held))
                print(rows[-1], flush=True)
    results = {
        "environment": report.environment(torch.device("cpu")),
        "length": args.length,
        "seeds": args.seeds,
        "default_rule": DEFAULT,
        "rules": RULES,
        "slots": all_slots,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", results)
    table = [
        [name + (" (the default rule)" if rule == DEFAULT else ""), str(slots)]
        + [str(sum(r["held"][f"{name}, R {slots}"] for r in rows if r["task"] == task)) for task in TASKS]
        + [str(sum(r["held"][f"{name}, R {slots}"] for r in rows))]
        for slots in all_slots
        for name, rule in RULES.items()
    ]
    per_task = len(rows) // len(TASKS) * rows[0]["layers"]
    lines = [
        f"# Which retrieval-key rule keeps the needle's answer: untrained default conversion, {args.length} tokens",
        "",
        report.environment_lines(results["environment"]),
        "",
        f"Layer-documents whose R retrieval keys hold every answer token (of {per_task} per task: "
        f"{rows[0]['layers']} converted layers x {len(rows) // len(TASKS)} documents; depths {DEPTHS}, seeds "
        f"{args.seeds}). Rule: the last N queries observed, their weights summed per key or its best, keys kept before "
        "/ after a scoring one.",
        "",
        report.markdown_table(["rule", "R"] + list(TASKS) + ["both"], table),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
