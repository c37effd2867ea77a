"""Variants of the hybrid layer that an untrained conversion might recall with, on the real teacher.

    python benchmarks/recall_probe_variants.py --teacher PATH_OR_ID --out DIR

Teacher-forced passkey (does the model predict every token of the key after the prompt?) at 256 and 512 tokens,
needle depths 0/50/100, for the teacher and for untrained conversions (window 64) whose hybrid layers are changed in a
patched copy of the reference formula: the first S keys added to every query's softmax window and taken out of the
linear term (attention sinks), and the linear term scaled by (1 - window factor). A probe, not a mixer: the patch
replaces the parallel hybrid op for this process only. Writes DIR/results.json and DIR/results.md.
"""

import argparse
import itertools
from pathlib import Path

import torch

import hf_based.modeling.modeling_based as modeling
from hf_based.bench import report
from hf_based.conversion import Recipe, linearize_model, load_teacher
from hf_based.conversion.recipe import LOLCATS
from hf_based.eval.retrieval import passkey_doc
from hf_based.kernels.hybrid.reference import _prepare
from hf_based.kernels.softmax.reference import key_distance, normalise, stable_exp

VARIANT = {"sink": 0, "damp": False}


def hybrid_variant(q, k, v, q_feat, k_feat, window_factor, window, key_mask=None, initial_state=None,
                   output_final_state=False, scale=None):  # fmt: skip
    """hybrid_attention (no state) with VARIANT's sink keys and damped linear term."""
    q, k, v, q_feat, k_feat, window_factor, real, _, _, scale = _prepare(
        q, k, v, q_feat, k_feat, window_factor, window, key_mask, initial_state, scale
    )
    if VARIANT["damp"]:
        q_feat = q_feat * (1 - window_factor)[None, None, :, None]
    distance = key_distance(q.shape[1], k.shape[1], q.device)  # [Tq, Tk]
    sink = (torch.arange(k.shape[1], device=q.device) < VARIANT["sink"])[None, :] & (distance >= 0)
    in_window = (((distance >= 0) & (distance < window)) | sink) & real[:, None, None, :]
    older = (distance >= window) & ~sink
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    a = window_factor[:, None, None] * stable_exp(scores, in_window)
    a = a + torch.einsum("bihf,bjhf->bhij", q_feat, k_feat) * older
    num = torch.einsum("bhij,bjhd->bihd", a, v)
    return normalise(num, a.sum(-1).transpose(1, 2)), None


def key_predicted(model, tokenizer, docs) -> list[bool]:
    hits = []
    for doc in docs:
        prompt, key = tokenizer(doc["input"]).input_ids, tokenizer(" " + doc["outputs"][0]).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt + key]), use_cache=False).logits
        hits.append(logits[0, len(prompt) - 1 : -1].argmax(-1).tolist() == key)
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    teacher, tokenizer = load_teacher(args.teacher, dtype=torch.float32)
    docs = [passkey_doc(tokenizer, length, depth, 0) for length in (256, 512) for depth in (0, 50, 100)]
    rows = {"teacher": key_predicted(teacher, tokenizer, docs)}
    modeling.hybrid_attention = hybrid_variant
    for factor in (0.1, 0.9, 0.999):
        model = linearize_model(teacher, Recipe(**{**LOLCATS, "window_factor_init": factor})).eval()
        for sink, damp in itertools.product((0, 1, 4, 16), (False, True)):
            VARIANT.update(sink=sink, damp=damp)
            name = f"window 64, factor {factor}, sink {sink}" + (", linear x (1 - factor)" if damp else "")
            rows[name] = key_predicted(model, tokenizer, docs)
            print(name, rows[name], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = report.environment(torch.device("cpu"))
    cells = [f"{doc['length']} @ {doc['depth']}%" for doc in docs]
    report.write_json(out / "results.json", {"environment": env, "teacher": args.teacher, "prompts": cells,
                                             "key_predicted": rows})  # fmt: skip
    table = report.markdown_table(["model", *cells, "total"],
                                  [[name, *("yes" if h else "-" for h in hits), f"{sum(hits)}/{len(hits)}"]
                                   for name, hits in rows.items()])  # fmt: skip
    (out / "results.md").write_text(f"# Recall variants of untrained conversions\n\n{report.environment_lines(env)}\n\n"
                                    f"{table}\n")  # fmt: skip


if __name__ == "__main__":
    main()
