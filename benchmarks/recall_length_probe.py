"""Why a converted model stops recalling beyond its training length: damp the hybrid layers' linear term at inference.

    python benchmarks/recall_length_probe.py MODEL --out DIR [--lengths 256,1024,2048] [--scales 1,0.3,0,upto:256]

MODEL is a converted checkpoint (e.g. what `hf-based demo` writes). In every hybrid layer the linear term over the
keys older than the window (numerator and denominator alike) is multiplied by each scale in turn, by scaling the
query features, with no training: 1 is the model as it is, 0 leaves only the sliding-window softmax. `upto:L` scales
the query at position t by min(1, (L - w) / (t + 1 - w)) (w the window), so that the linear term weighs as much as
over the L - w older keys of an L-token training sequence, however long the prompt. If retrieval at long prompts
comes back, the linear term's growth with the number of older keys is what drowns the window and the softmax layers'
recall there. Scores niah_single (`hf-based eval`, seed 0) and writes DIR/results.json and DIR/results.md with date,
commit and machine.
"""

import argparse
import contextlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_based.bench import report
from hf_based.eval import evaluate
from hf_based.modeling.modeling_based import BasedHybridAttention


def position_scales(scale: str, positions: torch.Tensor, window: int) -> torch.Tensor:
    """The factor for the queries at `positions`: a constant, or `upto:L` (see the module's docstring)."""
    if not scale.startswith("upto:"):
        return torch.full(positions.shape, float(scale))
    older_in_training = int(scale.removeprefix("upto:")) - window
    return (older_in_training / (positions + 1 - window).clamp(min=1)).clamp(max=1.0)


@contextlib.contextmanager
def linear_term_scaled(model, scale: str):
    """While active, every hybrid layer's query features (and so its linear term) are multiplied by `scale`.

    Positions are counted per layer from the last multi-token call (the prompt's prefill; generation then feeds one
    token at a time), which holds for unpadded prompts evaluated one at a time.
    """
    window = model.config.sliding_window

    def scale_features(module, _inputs, features):  # features: [B, T, H, F]
        length = features.shape[1]
        start = module.next_position if length == 1 else 0
        module.next_position = start + length
        factor = position_scales(scale, torch.arange(start, start + length), window)
        return features * factor.to(features)[None, :, None, None]

    hooks = [
        module.feature_map_q.register_forward_hook(scale_features)
        for module in model.modules()
        if isinstance(module, BasedHybridAttention)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", default="256,1024,2048")
    parser.add_argument("--scales", default="1,0.3,0.1,0", help="constants, or upto:L (see above)")
    parser.add_argument("--samples", type=int, default=1, help="prompts per length and depth (5 depths)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lengths = [int(n) for n in args.lengths.split(",")]
    metadata = {"max_seq_lengths": lengths, "num_samples": args.samples}
    results = {}
    for scale in args.scales.split(","):
        with linear_term_scaled(model, scale):
            results[scale] = evaluate(model, "niah_single", tokenizer=tokenizer, metadata=metadata)["niah_single"]
        print(scale, results[scale], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = report.environment(device)
    report.write_json(
        out / "results.json", {"environment": env, "model": Path(args.model).name, "niah_single": results}
    )
    header = ["linear term x", *[f"niah_single {n}" for n in lengths]]
    rows = [[scale, *[f"{scores[str(n)]:.2f}" for n in lengths]] for scale, scores in results.items()]
    (out / "results.md").write_text(
        f"# Retrieval vs the hybrid layers' linear term, scaled at inference\n\n{report.environment_lines(env)}\n\n"
        f"Model: {Path(args.model).name}; niah_single, seed 0, {args.samples} prompt(s) per length and depth "
        f"0/25/50/75/100.\n\n{report.markdown_table(header, rows)}\n"
    )


if __name__ == "__main__":
    main()
