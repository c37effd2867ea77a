"""Quick start: create a tiny BASED model with the CLI, generate with it, reload it through remote code.

    python examples/quickstart.py [OUT]    # OUT defaults to a temporary directory

The model is randomly initialised, so the generated text is gibberish; it shows the plumbing, not a trained model.
"""

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

import hf_based  # noqa: F401  (registers the "based" model type with the Auto classes)
from hf_based.cli import main as hf_based_cli
from hf_based.tokenizer import load_tokenizer


def generate(model, tokenizer, prompt: str) -> torch.Tensor:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=20, do_sample=False)


def quickstart(out: str) -> None:
    hf_based_cli(["init", out, "--preset", "tiny", "--seed", "0"])  # same as `hf-based init OUT --preset tiny`
    tokenizer = load_tokenizer(out)
    prompt = "The capital of France is"

    model = AutoModelForCausalLM.from_pretrained(out).eval()  # through the registration done by `import hf_based`
    tokens = generate(model, tokenizer, prompt)
    print(f"{type(model).__name__}: {tokenizer.decode(tokens[0])!r}")

    # What a process that never imported hf_based does: config.json's auto_map points at the shim files in OUT.
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    remote_tokens = generate(remote, tokenizer, prompt)
    assert torch.equal(tokens, remote_tokens), "the reloaded model generated different tokens"
    print(f"reloaded with trust_remote_code=True: {tokenizer.decode(remote_tokens[0])!r}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        quickstart(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            quickstart(tmp)
