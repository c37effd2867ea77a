"""Tiny Llama-family teachers, tokenizer, data and recipes shared by the conversion tests."""

import json
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_based.conversion import Recipe, convert
from hf_based.conversion.data import ALPACA_PROMPT_NO_INPUT

WORDS = (
    "the cat dog fox bird runs jumps sits flies over under near a an big small red blue green old new house "
    "tree river hill sun moon and then so because later"
).split()
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS and the Alpaca template's words: tiny vocabulary, fast tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    template_words = ALPACA_PROMPT_NO_INPUT.replace("\n", " ").replace(".", " ").replace(":", " ").split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in [*WORDS, *template_words, ".", ":", "!", ",", "?"]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def make_teacher(cls=LlamaForCausalLM, config_cls=LlamaConfig, vocab=128, layers=4, seed=0, **overrides):
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **overrides,
    )
    model = cls(config).eval()
    with torch.no_grad():  # larger weights than the default init: peaked attention, a real conversion problem
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    return model


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "instruction": " ".join(rng.choices(WORDS, k=6)),
            "input": "" if i % 2 else " ".join(rng.choices(WORDS, k=4)),
            "output": " ".join(rng.choices(WORDS, k=rng.randint(10, 30))),
        }
        for i in range(n)
    ]


def make_workdir(root: Path, tokenizer) -> Path:
    """A tiny Llama teacher (GQA, llama3 RoPE scaling, untied) saved with its tokenizer, and Alpaca-style data."""
    teacher = make_teacher(vocab=len(tokenizer), rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    (root / "alpaca.json").write_text(json.dumps(records(300)))
    return root


# Small budgets: seq 32, 2 x 2 sequences a step.
# Command-line flags for the hybrid layers with their linear term, which stage 1 trains (the default has none).
LINEAR_TERM_FLAGS = ["--sinks", "0", "--linear-factor-init", "none"]


def tiny_recipe(**overrides) -> Recipe:
    values = dict(
        window=8,
        seq_len=32,
        batch_size=2,
        grad_accum=2,
        stage1_steps=6,
        stage2_steps=4,
        checkpoint_every=2,
        stage2_lr=1e-3,
        # as LINEAR_TERM_FLAGS
        sinks=0,
        linear_factor_init=None,
    )
    return Recipe(**{**values, **overrides})


def run(workdir, out, recipe, **kwargs):
    kwargs.setdefault("data", str(workdir / "alpaca.json"))
    kwargs.setdefault("val_records", 40)
    kwargs.setdefault("val_sequences", 2)
    return convert(str(workdir / "teacher"), workdir / out, recipe, progress=False, **kwargs)
