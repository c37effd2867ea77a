"""Tokenizers for hf-based models: the bundled GPT-2 BPE (what BASED was trained with) or any transformers one."""

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

GPT2_DIR = Path(__file__).parent / "assets" / "gpt2"
GPT2_SPECIAL = "<|endoftext|>"


def load_tokenizer(path_or_id: str | None = None) -> PreTrainedTokenizerBase:
    """The bundled GPT-2 tokenizer (`None`), or `AutoTokenizer.from_pretrained(path_or_id)` for a local dir or hub id.

    The GPT-2 tokenizer (50,257 tokens, identical to the hub's "gpt2") uses "<|endoftext|>" as bos/eos/unk and as pad
    token, with `model_max_length=2048`. Padding stays on the right (transformers' default): set
    `tokenizer.padding_side = "left"` before batched generation.
    """
    if path_or_id is not None:
        return AutoTokenizer.from_pretrained(path_or_id)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(GPT2_DIR / "tokenizer.json"),
        bos_token=GPT2_SPECIAL,
        eos_token=GPT2_SPECIAL,
        unk_token=GPT2_SPECIAL,
        pad_token=GPT2_SPECIAL,  # GPT-2 has no pad token; padded positions are masked out anyway
        model_max_length=2048,
    )
