"""The default recipe keeps in-context recall where LoLCATs' loses it: a tiny teacher trained to copy is converted
both ways, and its copy accuracy measured on sequences neither it nor the conversion saw."""

import json
import random

import pytest
import torch
from conversion_helpers import WORDS, make_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from hf_based.conversion import Recipe, convert
from hf_based.conversion.recipe import LOLCATS

COPIED = 16  # words, then a separator, then the same words again: the copy lies 17 positions back
WINDOW, SINKS = 4, 2  # so the window and sinks alone cannot copy (the default's 64 and 64, scaled down)


def copy_sequences(tokenizer, count: int, seed: int) -> torch.Tensor:
    """[count, 2 * COPIED + 1] token ids: COPIED random words, ".", the same words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.choices(WORDS, k=COPIED)
        rows.append(tokenizer.convert_tokens_to_ids([*words, ".", *words]))
    return torch.tensor(rows)


def copy_accuracy(model, ids: torch.Tensor) -> float:
    """Fraction of the repeated words that the model predicts (argmax) from the ones before them."""
    with torch.no_grad():
        predicted = model(input_ids=ids, use_cache=False).logits[:, COPIED:-1].argmax(-1)
    return (predicted == ids[:, COPIED + 1 :]).float().mean().item()


@pytest.fixture(scope="module")
def copy_teacher():
    """A 5-layer Llama trained until it copies (an induction circuit), and the word-level tokenizer."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    teacher = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(300):
        ids = copy_sequences(tokenizer, 32, seed=step)
        logits = teacher(input_ids=ids).logits[:, COPIED:-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, COPIED + 1 :].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return teacher.eval(), tokenizer


def convert_copy_teacher(copy_teacher, tmp_path, **recipe):
    teacher, tokenizer = copy_teacher
    rng = random.Random(1)
    texts = [" ".join([*(words := rng.choices(WORDS, k=COPIED)), ".", *words]) for _ in range(200)]
    tmp_path.mkdir()
    data = tmp_path / "copies.json"
    data.write_text(json.dumps([{"text": text} for text in texts]))
    settings = dict(window=WINDOW, sinks=SINKS, seq_len=64, batch_size=4, grad_accum=1, stage1_steps=10, stage2_steps=5)
    result = convert(
        out=tmp_path / "converted",
        recipe=Recipe(**settings | recipe),
        teacher=teacher,
        tokenizer=tokenizer,
        data=str(data),
        val_records=20,
        val_sequences=2,
        progress=False,
    )
    return result.model.cpu().float()


def test_default_recipe_keeps_copying_that_lolcats_loses(copy_teacher, tmp_path):
    teacher, tokenizer = copy_teacher
    held_out = copy_sequences(tokenizer, 64, seed=10_000)  # the teacher trained on seeds < 300
    assert copy_accuracy(teacher, held_out) > 0.95

    lolcats = convert_copy_teacher(copy_teacher, tmp_path / "lolcats", **LOLCATS)
    default = convert_copy_teacher(copy_teacher, tmp_path / "default")

    kept = [i for i, mixer in enumerate(default.config.mixer_types) if mixer == "full_attention"]
    assert len(kept) == 1  # 20% of 5 layers
    assert copy_accuracy(lolcats, held_out) < 0.5  # measured 0.08
    assert copy_accuracy(default, held_out) > 0.85  # measured 0.99
