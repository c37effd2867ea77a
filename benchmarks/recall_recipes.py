"""Which conversion recipe keeps in-context recall: SmolLM2 converted several ways, scored on retrieval and LAMBADA.

    python benchmarks/recall_recipes.py --teacher PATH_OR_ID --out DIR [--variants a,b] [--minutes 9]

One GPU, bf16. The teacher is scored first; then each variant of VARIANTS is converted on the Alpaca data (the same
small budget for all, `--stage1-steps` and `--stage2-steps` of `--batch-size` x `--seq-len` tokens) and scored:
- passkey and niah_single as `hf-based eval` runs them (greedy generation, the answer anywhere in the continuation),
  at `--lengths` x depths 0/25/50/75/100 x `--samples`, split = the generated tasks with seed `--task-seed`
  (each length on its own: one that runs out of memory is recorded as such, the others kept);
- LAMBADA (lm_eval's lambada_openai, test split, the first `--lambada-limit` documents): accuracy and perplexity;
- with `--zero-shot-limit N`, the six zero-shot tasks of convert_smollm2.py (validation splits), N documents each.
The conversions are scored in the teacher's dtype (bf16 on a GPU), as a user loads the saved model.
DIR/results.json and DIR/results.md are rewritten after every variant, with date, commit and machine; variants that
would overrun `--minutes` are skipped and listed. A rerun into the same DIR with the same settings keeps the models
scored there (the teacher included) and scores the rest, so a sweep can span several calls.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("hf_based") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from hf_based.bench import report  # noqa: E402
from hf_based.conversion import Recipe, convert, load_teacher  # noqa: E402
from hf_based.conversion.recipe import LOLCATS  # noqa: E402
from hf_based.eval import evaluate  # noqa: E402
from hf_based.modeling.compat import output_cache  # noqa: E402
from hf_based.utils import shared_data_dir  # noqa: E402

RETRIEVAL_TASKS = ("passkey", "niah_single")
DEPTHS = (0, 25, 50, 75, 100)
CACHE_CONTEXT = 8192
# The zero-shot suite of convert_smollm2.py, each with its headline metric (lambada_openai: its first documents).
ZERO_SHOT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai")
HEADLINE = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm"}  # others: acc
UNTRAINED = dict(stage1_steps=0, stage2_steps=0)
# The default recipe's converted layers (no linear term, 64 sinks, its retrieval keys), for the variants named after it
# ("copy:K linear 0 sinks 64" and its ablations); results before the keys were added here scored those with none
# (LoLCATs' 0) unless --retrieval-keys said otherwise.
DEFAULT = dict(window_factor_init=0.9, linear_factor_init=0, sinks=64, retrieval_keys=Recipe().retrieval_keys)
# name -> Recipe settings beyond the shared budget, each on top of LoLCATs' recipe.
VARIANTS = {
    name: LOLCATS | settings
    for name, settings in {
        "hybrid (LoLCATs)": {},
        "kl:6": dict(softmax_layers="kl:6"),
        "mse:6": dict(softmax_layers="mse:6"),
        "copy:6 untrained": dict(softmax_layers="copy:6", **UNTRAINED),
        "copy:6 stage 1 only": dict(softmax_layers="copy:6", stage2_steps=0),
        "copy:6": dict(softmax_layers="copy:6"),
        "copy:6 distill": dict(softmax_layers="copy:6", stage2_loss="distill"),
        # The window's softmax weighs more from the start (window factor 0.5 instead of LoLCATs' 0.1).
        **{f"copy:{k} factor 0.5": dict(softmax_layers=f"copy:{k}", window_factor_init=0.5) for k in (0, 1, 2, 4, 6)},
        "copy:6 factor 0.9": dict(softmax_layers="copy:6", window_factor_init=0.9),
        "copy:6 factor 0.5 window 128": dict(softmax_layers="copy:6", window_factor_init=0.5, window=128),
        # Window factor ~1. Meant to leave the window's softmax alone, but the factor weighs only the window: the linear
        # term keeps its weight 1 (the `linear N` variants below are what switches it off).
        "copy:6 window only": dict(softmax_layers="copy:6", window_factor_init=1 - 1e-9),
        "copy:6 window only untrained": dict(softmax_layers="copy:6", window_factor_init=1 - 1e-9, **UNTRAINED),
        "copy:6 factor 0.9 stage 1 only": dict(softmax_layers="copy:6", window_factor_init=0.9, stage2_steps=0),
        # Longer training sequences, the same tokens per step: does recall reach as far as training does?
        **{
            f"copy:6 factor 0.9 seq {n}": dict(
                softmax_layers="copy:6", window_factor_init=0.9, seq_len=n, batch_size=8 * 1024 // n
            )
            for n in (2048, 4096)
        },
        "copy:6 factor 0.9 4x budget": dict(
            softmax_layers="copy:6", window_factor_init=0.9, stage1_steps=800, stage2_steps=400
        ),
        # Attention sinks: the first tokens stay in the converted layers' softmax part, out of the linear state.
        **{
            f"copy:6 factor 0.9 sinks {n}": dict(softmax_layers="copy:6", window_factor_init=0.9, sinks=n)
            for n in (4, 16, 64)
        },
        # copy:6's layers without sinks (with sinks the criterion picks 14 instead of 19): sinks alone.
        **{
            f"layers 0 17-20 23 factor 0.9 sinks {n}": dict(
                softmax_layers=(0, 17, 18, 19, 20, 23), window_factor_init=0.9, sinks=n
            )
            for n in (16, 64)
        },
        # A learned weight on the linear term (`linear_factor_init`): 1e-6 leaves the window and its sinks alone
        # (stage 1, which trains the feature maps, has nothing to do then), 0.1 lets training raise it.
        "layers 0 17-20 23 linear 1e-6 sinks 64 untrained": dict(
            softmax_layers=(0, 17, 18, 19, 20, 23),
            window_factor_init=0.9,
            linear_factor_init=1e-6,
            sinks=64,
            **UNTRAINED,
        ),
        "layers 0 17-20 23 linear 1e-6 sinks 64 LoRA only": dict(
            softmax_layers=(0, 17, 18, 19, 20, 23),
            window_factor_init=0.9,
            linear_factor_init=1e-6,
            sinks=64,
            stage1_steps=0,
        ),
        # No linear term at all (0): the same as 1e-6 without the unused feature maps and state; stage 1 is skipped.
        "layers 0 17-20 23 linear 0 sinks 64": dict(
            softmax_layers=(0, 17, 18, 19, 20, 23), window_factor_init=0.9, linear_factor_init=0, sinks=64
        ),
        # ... untrained, with retrieval keys: the copy criterion's probe skipped (it picks these layers; slow on a CPU).
        "layers 0 17-20 23 linear 0 sinks 64 untrained": DEFAULT
        | dict(softmax_layers=(0, 17, 18, 19, 20, 23), **UNTRAINED),
        # ... with the layers the copy criterion picks (`Recipe.selection_probe`): the default as `hf-based convert`
        # runs it.
        "copy:6 linear 0 sinks 64": DEFAULT | dict(softmax_layers="copy:6"),
        # Its ablations: no LoRA, no sinks.
        "copy:6 linear 0 sinks 64 untrained": DEFAULT | dict(softmax_layers="copy:6", **UNTRAINED),
        # LoRA that stays closer to the teacher (its logits as targets, or fewer steps): does passkey survive it?
        "copy:6 linear 0 sinks 64 distill": DEFAULT | dict(softmax_layers="copy:6", stage2_loss="distill"),
        "copy:6 linear 0 sinks 64 LoRA 25 steps": DEFAULT | dict(softmax_layers="copy:6", stage2_steps=25),
        "copy:6 linear 0 no sinks": DEFAULT | dict(softmax_layers="copy:6", sinks=0),
        # Fewer softmax layers (the Pareto table), with LoRA and as the default converts (untrained).
        **{f"copy:{k} linear 0 sinks 64": DEFAULT | dict(softmax_layers=f"copy:{k}") for k in (0, 1, 2, 4)},
        **{
            f"copy:{k} linear 0 sinks 64 untrained": DEFAULT | dict(softmax_layers=f"copy:{k}", **UNTRAINED)
            for k in (0, 1, 2, 4)
        },
        "layers 0 17-20 23 linear 0.1 sinks 64": dict(
            softmax_layers=(0, 17, 18, 19, 20, 23), window_factor_init=0.9, linear_factor_init=0.1, sinks=64
        ),
        "copy:6 factor 0.9 sinks 16 untrained": dict(
            softmax_layers="copy:6", window_factor_init=0.9, sinks=16, **UNTRAINED
        ),
        "copy:6 factor 0.9 sinks 16 seq 2048": dict(
            softmax_layers="copy:6", window_factor_init=0.9, sinks=16, seq_len=2048, batch_size=4
        ),
        **{
            f"copy:{k} factor 0.9 sinks 16": dict(softmax_layers=f"copy:{k}", window_factor_init=0.9, sinks=16)
            for k in (0, 2, 4)
        },
    }.items()
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, metavar="PATH_OR_ID", help=".gguf file, directory or hub id")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="names from VARIANTS, comma-separated")
    parser.add_argument("--data", default=shared_data_dir() / "corpora" / "alpaca_5000.json", help="training data")
    parser.add_argument("--eval-data-dir", default=shared_data_dir() / "eval", help="lm-eval task data (JSONL)")
    parser.add_argument("--stage1-steps", type=int, default=200)
    parser.add_argument("--stage2-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--samples", type=int, default=2, help="documents per task, length and depth")
    parser.add_argument(
        "--task-seed",
        type=int,
        default=0,
        help="seed of the generated retrieval documents; sample i takes seed + i, so held-out prompts need a seed at "
        "least --samples away from every seed already looked at",
    )
    parser.add_argument("--tasks", default=",".join(RETRIEVAL_TASKS), help="retrieval tasks, comma-separated")
    parser.add_argument("--lambada-limit", type=int, default=500)
    parser.add_argument(
        "--zero-shot-limit", type=int, default=0, metavar="N", help="also score the zero-shot suite, N documents each"
    )
    parser.add_argument(
        "--save-states",
        metavar="DIR",
        help="also save each variant's trained parameters (stage-1 feature maps and window factors, LoRA) and its "
        "recipe as DIR/<variant>.pt, for `assemble()` to rebuild the model elsewhere",
    )
    parser.add_argument(
        "--retrieval-keys",
        metavar="N,M,...",
        help="score each conversion's retrieval once per value of hybrid_retrieval_keys (a generation setting: "
        "one training serves all), one row each; LAMBADA and zero-shot are scored once, with the recipe's; default: "
        "the recipe's",
    )
    parser.add_argument("--minutes", type=float, default=9.0, help="skip variants that would overrun this")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; accepted: {', '.join(VARIANTS)}")
    return args


# What makes two runs' scores comparable: a rerun into the same directory keeps the earlier models only if these match.
SETTINGS = (
    "teacher",
    "data",
    "lengths",
    "tasks",
    "samples",
    "task_seed",
    "lambada_limit",
    "zero_shot_limit",
    "budget",
    "retrieval_keys",
)


def earlier_models(path: Path, results: dict) -> dict:
    """The models an earlier run scored into `path` with the same settings as `results`; the variants it ran join
    `results["variants"]`. A file with other settings is an error rather than a mix of incomparable rows."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    differing = [key for key in SETTINGS if earlier.get(key) != results[key]]
    if differing:
        key = differing[0]
        raise SystemExit(
            f"{path} was scored with {key}={earlier.get(key)!r}, not {results[key]!r}; accepted: the same settings "
            "(to add rows to it) or another --out"
        )
    results["variants"] = earlier["variants"] | results["variants"]
    return {name: entry for name, entry in earlier["models"].items() if "error" not in entry}


def score(model, tokenizer, args) -> dict:
    """{"retrieval": {task: {length: accuracy or None}}, "cache_mib": ..., "lambada": {metric: value}, "zero_shot":
    {task: {metric: value}} (with --zero-shot-limit)} of one model. Each length is scored on its own: running out of
    memory at one (None) keeps the others."""
    return score_retrieval(model, tokenizer, args) | score_standard(model, tokenizer, args)


def score_retrieval(model, tokenizer, args) -> dict:
    retrieval = {}
    for length in (int(n) for n in args.lengths.split(",")):
        metadata = {
            "max_seq_lengths": [length],
            "depths": list(DEPTHS),
            "num_samples": args.samples,
            "seed": args.task_seed,
        }
        try:
            scores = evaluate(model, args.tasks, tokenizer=tokenizer, batch_size=8, metadata=metadata)
        except torch.OutOfMemoryError:
            scores = {task: {str(length): None} for task in args.tasks.split(",")}
            torch.cuda.empty_cache()
        for task, by_length in scores.items():
            retrieval.setdefault(task, {}).update(by_length)
    return {"retrieval": retrieval, "cache_mib": cache_mib(model, CACHE_CONTEXT)}


def score_standard(model, tokenizer, args) -> dict:
    standard = dict(tokenizer=tokenizer, data_dir=args.eval_data_dir, batch_size=32)
    entry = {"lambada": evaluate(model, "lambada_openai", limit=args.lambada_limit, **standard)["lambada_openai"]}
    if args.zero_shot_limit:
        entry["zero_shot"] = evaluate(model, ZERO_SHOT_TASKS, limit=args.zero_shot_limit, **standard)
    return entry


def score_conversion(model, tokenizer, args) -> dict:
    """{row suffix: entry}: one row per --retrieval-keys value (the standard tasks scored once), or the model as
    converted."""
    if not args.retrieval_keys:
        return {"": score(model, tokenizer, args)}
    standard = score_standard(model, tokenizer, args)
    rows = {}
    for keys in (int(n) for n in args.retrieval_keys.split(",")):
        model.config.hybrid_retrieval_keys = keys
        rows[f", retrieval keys {keys}"] = score_retrieval(model, tokenizer, args) | standard | {"retrieval_keys": keys}
    return rows


@torch.no_grad()
def cache_mib(model, context: int) -> float:
    """MiB that the model's cache holds for one sequence after `context` tokens (every tensor of every layer)."""
    ids = torch.randint(model.config.vocab_size, (1, context), device=model.device)
    cache = output_cache(model(input_ids=ids, use_cache=True, logits_to_keep=1))
    tensors = [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    return sum(t.nbytes for t in tensors) / 2**20


def save_states(converted_dir: Path, recipe: Recipe, softmax: list[int], out_dir: str, name: str) -> None:
    """DIR/<name>.pt: the recipe (its softmax layers as indices) and the trained parameters of both stages, without
    optimizer state: `assemble(teacher, Recipe.from_dict(recipe), stage1, lora)` rebuilds the converted model."""
    states = {}
    for stage, file in (("stage1", "stage1.pt"), ("lora", "stage2.pt")):
        path = converted_dir / "checkpoints" / file
        states[stage] = torch.load(path, map_location="cpu", weights_only=False)["model"] if path.exists() else None
    recipe = recipe.with_softmax_layers(softmax).to_dict()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save({"recipe": recipe, **states}, Path(out_dir) / f"{name.replace(' ', '_').replace(':', '')}.pt")


def accuracy(value: float | None) -> str:
    return "oom" if value is None else f"{value:.2f}"


def zero_shot_average(entry: dict) -> float:
    """The zero-shot suite's average of headline metrics."""
    return sum(entry["zero_shot"][t][HEADLINE.get(t, "acc")] for t in ZERO_SHOT_TASKS) / len(ZERO_SHOT_TASKS)


def markdown(results: dict) -> str:
    env = results["environment"]
    lengths = results["lengths"]
    teacher = results["models"].get("teacher", {})
    header = ["model", "softmax layers"]
    tasks = results["tasks"]
    header += [f"{task} {n}" for task in tasks for n in lengths]
    header += ["LAMBADA acc", "LAMBADA ppl", "ppl / teacher's"]
    zero_shot = "zero_shot" in teacher
    header += ["zero-shot average", "/ teacher's"] if zero_shot else []
    header += [f"cache MiB at {CACHE_CONTEXT}", "minutes"]
    rows = []
    for name, entry in results["models"].items():
        if "error" in entry:
            rows.append([name, "-", f"failed: {entry['error']}"] + [""] * (len(header) - 3))
            continue
        by_length = entry["retrieval"]
        ppl = entry["lambada"]["perplexity"]
        base = teacher.get("lambada", {}).get("perplexity")
        rows.append(
            [name, str(entry.get("softmax_layers", "all"))]
            + [accuracy(by_length[task][str(n)]) for task in tasks for n in lengths]
            + [f"{entry['lambada']['acc']:.3f}", f"{ppl:.1f}", f"{ppl / base:.2f}x" if base else "-"]
            + (
                [f"{zero_shot_average(entry):.4f}", f"{zero_shot_average(entry) / zero_shot_average(teacher):.1%}"]
                if zero_shot
                else []
            )
            + [f"{entry['cache_mib']:.1f}" if "cache_mib" in entry else "not measured"]
            + [f"{entry.get('seconds', 0) / 60:.1f}"]
        )
    budget = results["budget"]
    lines = [
        "# Recall by conversion recipe: SmolLM2-135M-Instruct",
        "",
        report.environment_lines(env),
        "",
        f"Teacher: {results['teacher']}. Training: {results['data']}, stage 1 {budget['stage1_steps']} and stage 2 "
        f"{budget['stage2_steps']} steps of {budget['tokens_per_step']:,} tokens in sequences of {budget['seq_len']} "
        "(unless the variant says otherwise). "
        f"Retrieval: `hf-based eval` (greedy, the answer anywhere in the continuation), "
        f"{results['samples']} documents per length and depth 0/25/50/75/100, seed {results.get('task_seed', 0)}. "
        "LAMBADA: lm-eval "
        f"lambada_openai, test split, first {results['lambada_limit']} documents. Cache: bytes of every cached tensor "
        f"for one sequence after {CACHE_CONTEXT} tokens, in the model's dtype."
        + (
            f" Zero-shot: {', '.join(ZERO_SHOT_TASKS)} (acc; acc_norm for arc_challenge and hellaswag; validation "
            f"splits, lambada_openai's test split), the first {results['zero_shot_limit']} documents each."
            if results.get("zero_shot_limit")
            else ""
        ),
        "",
        report.markdown_table(header, rows),
    ]
    if results["skipped"]:
        lines += ["", f"Skipped for time: {', '.join(results['skipped'])}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_teacher(args.teacher, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    results = {
        "environment": report.environment(device),
        "teacher": Path(args.teacher).name,
        "data": Path(args.data).name,
        "lengths": [int(n) for n in args.lengths.split(",")],
        "tasks": args.tasks.split(","),
        "samples": args.samples,
        "task_seed": args.task_seed,
        "lambada_limit": args.lambada_limit,
        "zero_shot_limit": args.zero_shot_limit,
        "budget": {
            "stage1_steps": args.stage1_steps,
            "stage2_steps": args.stage2_steps,
            "tokens_per_step": args.batch_size * args.seq_len,
            "seq_len": args.seq_len,
        },
        "variants": {name: VARIANTS[name] for name in args.variants.split(",")},
        "retrieval_keys": args.retrieval_keys,
        "models": {},
        "skipped": [],
    }

    results["models"] = earlier_models(out / "results.json", results)

    def save() -> None:
        report.write_json(out / "results.json", results)
        (out / "results.md").write_text(markdown(results))

    if "teacher" not in results["models"]:
        begun = time.perf_counter()
        entry = score(teacher.to(device), tokenizer, args)
        results["models"]["teacher"] = entry | {"seconds": time.perf_counter() - begun}
        teacher.cpu()
        save()
    longest = 0.0
    with tempfile.TemporaryDirectory() as work:
        for name in args.variants.split(","):
            if any(row == name or row.startswith(name + ", ") for row in results["models"]):
                continue  # scored by an earlier run into this directory
            if time.perf_counter() - started + 1.2 * longest > 60 * args.minutes:
                results["skipped"].append(name)
                continue
            begun = time.perf_counter()
            recipe = Recipe(
                **{
                    "stage1_steps": args.stage1_steps,
                    "stage2_steps": args.stage2_steps,
                    "batch_size": args.batch_size,
                    "grad_accum": 1,
                    "seq_len": args.seq_len,
                    **VARIANTS[name],
                }
            )
            try:
                converted = convert(
                    out=Path(work) / str(len(results["models"])),
                    recipe=recipe,
                    teacher=teacher,
                    tokenizer=tokenizer,
                    base_name=results["teacher"],
                    data=args.data,
                    dtype=torch.bfloat16,
                    progress=False,
                )
                model = converted.model.to(device, teacher.dtype)  # convert() hands it back in fp32
                softmax = [i for i, m in enumerate(model.config.mixer_types) if m == "full_attention"]
                if args.save_states:
                    save_states(converted.out, recipe, softmax, args.save_states, name)
                rows = score_conversion(model, tokenizer, args)
                rows = {name + suffix: entry | {"softmax_layers": softmax} for suffix, entry in rows.items()}
                del converted, model
            except Exception as error:  # one failing variant should not lose the others' results
                traceback.print_exc()
                rows = {name: {"error": f"{type(error).__name__}: {error}"}}
            seconds = time.perf_counter() - begun
            longest = max(longest, seconds)
            for row, entry in rows.items():
                results["models"][row] = entry | {"seconds": seconds}
                print(f"{row}: {entry.get('retrieval', entry.get('error'))}", flush=True)
            torch.cuda.empty_cache() if device.type == "cuda" else None
            save()
    results["seconds"] = time.perf_counter() - started
    save()


if __name__ == "__main__":
    main()
