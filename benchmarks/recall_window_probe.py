"""Does the teacher still retrieve when all but a few of its layers see only a sliding window? No training.

    python benchmarks/recall_window_probe.py --teacher PATH_OR_ID --out DIR [--softmax-layers 0,17,18,19,20,23]
        [--variants full,window,window+sink4] [--lengths 256,1024,2048,4096] [--samples 2]

Each variant masks the teacher's attention layer by layer, through transformers' attention interface: `full` is the
teacher itself; `window` lets every layer outside --softmax-layers see only its last --window keys, the shape of a
converted model whose linear terms are off (what a conversion keeps at best without training); `window+sinkS` also
lets those layers see the first S tokens (StreamingLLM's attention sinks), `window+nullsinkS` the same with the sinks'
values zeroed (they only take attention away from the window, as a learned denominator term would). If `window` loses retrieval at long prompts
where `full` keeps it, the loss is in the architecture, not in training; if sinks bring it back, the window layers
miss the tokens the teacher parks attention on. Scores passkey and niah_single as `hf-based eval` does (greedy, the
answer anywhere in the continuation; the generated tasks, seed 0) and writes DIR/results.json (by length, and by
length and depth) and DIR/results.md with date, commit and machine. Runs on a CPU in minutes for SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from statistics import mean

import torch

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("hf_based") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: E402

from hf_based.bench import report  # noqa: E402
from hf_based.conversion import load_teacher  # noqa: E402
from hf_based.eval.retrieval import make_docs, process_results, settings  # noqa: E402
from hf_based.progress import progress_bar  # noqa: E402

ATTENTION = "window_probe"
DEPTHS = (0, 25, 50, 75, 100)


def visible_keys(q_len: int, k_len: int, window: int | None, sinks: int, device) -> torch.Tensor:
    """[Tq, Tk] bool: query i (at key position k_len - q_len + i) sees key j iff j <= p and (p - j < window or
    j < sinks); window None: every earlier key."""
    p = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)
    seen = j <= p
    if window is not None:
        seen &= (p - j < window) | (j < sinks)
    return seen


class LayerMasks:
    """The attention function of one variant: full attention in `softmax_layers`, window (+ sinks) elsewhere; with
    `null_sinks` the sinks' values are zeroed, so they only add to the softmax's denominator."""

    def __init__(self, softmax_layers: set[int], window: int | None, sinks: int, null_sinks: bool = False):
        self.softmax_layers, self.window, self.sinks, self.null_sinks = softmax_layers, window, sinks, null_sinks

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        window = None if module.layer_idx in self.softmax_layers else self.window
        mask = visible_keys(query.shape[2], key.shape[2], window, self.sinks, query.device)
        if window is not None and self.null_sinks:
            value = value.clone()
            value[:, :, : self.sinks] = 0
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, mask[None, None], is_causal=False, **kwargs)


def parse_variant(name: str, softmax_layers: set[int], window: int) -> LayerMasks:
    if name == "full":
        return LayerMasks(softmax_layers, None, 0)
    if name == "window":
        return LayerMasks(softmax_layers, window, 0)
    for prefix in ("window+sink", "window+nullsink"):
        if name.startswith(prefix) and name.removeprefix(prefix).isdigit():
            return LayerMasks(softmax_layers, window, int(name.removeprefix(prefix)), null_sinks="null" in prefix)
    raise SystemExit(f"unknown variant {name!r}; accepted: full, window, window+sinkS, window+nullsinkS (S an integer)")


@torch.no_grad()
def retrieved(model, tokenizer, doc: dict, new_tokens: int) -> float:
    ids = tokenizer(doc["input"], return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return next(iter(process_results(doc, [text]).values()))


def markdown(results: dict) -> str:
    lengths, tasks = results["lengths"], results["tasks"]
    header = ["variant"] + [f"{task} {n}" for task in tasks for n in lengths]
    rows = [
        [name] + [f"{scores[task][str(n)]:.2f}" for task in tasks for n in lengths]
        for name, scores in results["variants"].items()
    ]
    return "\n".join(
        [
            "# Retrieval of the teacher with sliding-window layers, untrained",
            "",
            report.environment_lines(results["environment"]),
            "",
            f"Teacher: {results['teacher']}. Full softmax attention in layers {results['softmax_layers']}; the others "
            f"see their last {results['window']} keys (plus the first S with `+sinkS`). Retrieval: greedy, "
            f"{results['new_tokens']} new tokens, the answer anywhere in them; {results['samples']} documents per "
            "length and depth 0/25/50/75/100, seed 0 (the generated tasks of `hf-based eval`).",
            "",
            report.markdown_table(header, rows),
            "",
        ]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, metavar="PATH_OR_ID", help=".gguf file, directory or hub id")
    parser.add_argument("--out", required=True)
    parser.add_argument("--softmax-layers", default="0,17,18,19,20,23", help="layers that keep full attention")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--variants", default="full,window,window+sink4")
    parser.add_argument("--tasks", default="niah_single,passkey")
    parser.add_argument("--lengths", default="256,1024,2048,4096")
    parser.add_argument("--samples", type=int, default=2, help="documents per task, length and depth")
    parser.add_argument("--new-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    softmax_layers = {int(i) for i in args.softmax_layers.split(",") if i}
    variants = {name: parse_variant(name, softmax_layers, args.window) for name in args.variants.split(",")}
    model, tokenizer = load_teacher(args.teacher, dtype=torch.float32)
    lengths = [int(n) for n in args.lengths.split(",")]
    config = settings({"max_seq_lengths": lengths, "depths": list(DEPTHS), "num_samples": args.samples, "seed": 0})
    docs = {task: make_docs(task, tokenizer, config) for task in args.tasks.split(",")}
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "environment": report.environment(torch.device("cpu")),
        "teacher": Path(args.teacher).name,
        "softmax_layers": sorted(softmax_layers),
        "window": args.window,
        "lengths": lengths,
        "tasks": list(docs),
        "samples": args.samples,
        "new_tokens": args.new_tokens,
        "variants": {},
    }
    for name, masks in variants.items():
        AttentionInterface.register(ATTENTION, masks)
        model.set_attn_implementation(ATTENTION)
        scores, by_depth = {}, {}
        for task, task_docs in docs.items():
            hits = [(doc, retrieved(model, tokenizer, doc, args.new_tokens)) for doc in
                    progress_bar(task_docs, desc=f"{name} {task}")]  # fmt: skip
            scores[task] = {str(n): mean(h for doc, h in hits if doc["length"] == n) for n in lengths}
            by_depth[task] = {
                str(n): {str(d): mean(h for doc, h in hits if (doc["length"], doc["depth"]) == (n, d)) for d in DEPTHS}
                for n in lengths
            }
        results["variants"][name] = scores
        results.setdefault("by_depth", {})[name] = by_depth
        report.write_json(out / "results.json", results)
        (out / "results.md").write_text(markdown(results))
        print(name, scores, flush=True)


if __name__ == "__main__":
    main()
