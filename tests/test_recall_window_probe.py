"""benchmarks/recall_window_probe.py: its per-layer masks mean what its docstring says, with and without a cache."""

import importlib.util
from pathlib import Path

import pytest
import torch
from conversion_helpers import make_teacher
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recall_window_probe.py"
spec = importlib.util.spec_from_file_location("recall_window_probe", SCRIPT)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_visible_keys_is_causal_window_plus_sinks():
    q_len, k_len, window, sinks = 3, 10, 4, 2
    seen = probe.visible_keys(q_len, k_len, window, sinks, "cpu")
    for i in range(q_len):
        p = k_len - q_len + i
        expected = [j <= p and (p - j < window or j < sinks) for j in range(k_len)]
        assert seen[i].tolist() == expected
    assert probe.visible_keys(q_len, k_len, None, 0, "cpu").tolist() == [
        [j <= k_len - q_len + i for j in range(k_len)] for i in range(q_len)
    ]


@pytest.fixture
def tiny_llama():
    ALL_MASK_ATTENTION_FUNCTIONS.register(probe.ATTENTION, sdpa_mask)
    return make_teacher(vocab=50, layers=3)


def logits_with(model, masks, ids):
    AttentionInterface.register(probe.ATTENTION, masks)
    model.set_attn_implementation(probe.ATTENTION)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_masks_change_only_what_they_should(tiny_llama):
    ids = torch.randint(50, (1, 20))
    tiny_llama.set_attn_implementation("sdpa")
    with torch.no_grad():
        teacher = tiny_llama(input_ids=ids).logits
    torch.testing.assert_close(logits_with(tiny_llama, probe.parse_variant("full", {1}, 4), ids), teacher)
    wide = probe.LayerMasks({1}, window=20, sinks=0)  # a window covering the prompt is full attention
    torch.testing.assert_close(logits_with(tiny_llama, wide, ids), teacher)
    windowed = logits_with(tiny_llama, probe.parse_variant("window", {1}, 4), ids)
    assert not torch.allclose(windowed, teacher, atol=1e-4)
    torch.testing.assert_close(windowed[:, :4], teacher[:, :4])  # the first 4 tokens see everything anyway
    sinks = logits_with(tiny_llama, probe.parse_variant("window+sink2", {1}, 4), ids)
    null_sinks = logits_with(tiny_llama, probe.parse_variant("window+nullsink2", {1}, 4), ids)
    assert not torch.allclose(sinks, windowed, atol=1e-4) and not torch.allclose(null_sinks, sinks, atol=1e-4)


@pytest.mark.parametrize("variant", ["window", "window+sink2"])
def test_cached_decoding_masks_like_a_full_forward(tiny_llama, variant):
    """generate() with a cache gives the tokens that argmax over a full forward of each prefix gives."""
    masks = probe.parse_variant(variant, {1}, 4)
    AttentionInterface.register(probe.ATTENTION, masks)
    tiny_llama.set_attn_implementation(probe.ATTENTION)
    prompt = torch.randint(50, (1, 12))
    out = tiny_llama.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, logits_with(tiny_llama, masks, ids)[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == ids.tolist()


def test_unknown_variant_is_one_line_error():
    with pytest.raises(SystemExit, match="unknown variant 'sinks'; accepted: full, window"):
        probe.parse_variant("sinks", {0}, 4)
