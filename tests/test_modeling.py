"""Model-level tests on tiny configurations (CPU, fp64 where exactness is checked)."""

import os
import subprocess
import sys
import textwrap
from unittest.mock import patch

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_based import BasedCache, BasedConfig, BasedForCausalLM, preset_config
from hf_based.kernels import softmax_attention
from hf_based.kernels.retrieval.reference import RETRIEVAL_QUERIES
from hf_based.modeling import modeling_based
from hf_based.modeling.cache import BasedHybridLayer
from hf_based.modeling.compat import CACHE_FIELD
from hf_based.modeling.prefill_graphs import PrefillGraphs, copy_layers

VOCAB = 101
WINDOW = 5

# name -> config overrides; each stack exercises one mixer (twice, so layer outputs feed a same-kind layer) or a mix.
STACKS = {
    "linear_taylor": dict(mixer_types=["linear_attention"] * 2),
    "linear_hedgehog_llama": dict(
        mixer_types=["linear_attention"] * 2, feature_map="hedgehog", linear_attention_projections="llama"
    ),
    "sliding_window": dict(mixer_types=["sliding_window_attention"] * 2),
    "hybrid_hedgehog": dict(mixer_types=["hybrid_attention"] * 2, feature_map="hedgehog"),
    "hybrid_taylor": dict(mixer_types=["hybrid_attention"] * 2),
    "base_conv": dict(mixer_types=["base_conv"] * 2),
    "full_attention": dict(mixer_types=["full_attention"] * 2),
    "based_mix": dict(mixer_types=["base_conv", "linear_attention", "sliding_window_attention", "base_conv"]),
    "lolcats_mix": dict(mixer_types=["hybrid_attention", "full_attention"], feature_map="hedgehog"),
    "hybrid_sinks": dict(mixer_types=["hybrid_attention"] * 2, feature_map="hedgehog", hybrid_attention_sinks=3),
    "hybrid_linear_factor": dict(
        mixer_types=["hybrid_attention"] * 2,
        feature_map="hedgehog",
        hybrid_attention_sinks=3,
        hybrid_linear_factor_init=0.3,
    ),
    "hybrid_no_linear": dict(
        mixer_types=["hybrid_attention"] * 2, hybrid_attention_sinks=3, hybrid_linear_factor_init=0
    ),
    # The default conversion's layers: window, sinks and retrieval keys, no linear term.
    "hybrid_retrieval": dict(
        mixer_types=["hybrid_attention"] * 2,
        hybrid_attention_sinks=3,
        hybrid_linear_factor_init=0,
        hybrid_retrieval_keys=2,  # fewer than a test prompt's keys that leave the window: a real choice
    ),
}
CONSTANT_STATE_STACKS = [name for name, kw in STACKS.items() if "full_attention" not in kw["mixer_types"]]
# Whose generation is its full forward: retrieval keys that a prefill chose stay visible to later queries, by design.
FORWARD_STACKS = [name for name, kw in STACKS.items() if not kw.get("hybrid_retrieval_keys")]


def tiny_config(**overrides) -> BasedConfig:
    defaults = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        feature_dim=4,
        hedgehog_dim=6,
        sliding_window=WINDOW,
        intermediate_size=48,
        conv_intermediate_size=40,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    defaults.update(overrides)
    defaults["num_hidden_layers"] = len(defaults["mixer_types"])
    return BasedConfig(**defaults)


def tiny_model(name: str, dtype=torch.float64, seed=0) -> BasedForCausalLM:
    torch.manual_seed(seed)
    model = BasedForCausalLM(tiny_config(**STACKS[name])).to(dtype).eval()
    # Make the hybrid layers' window (and linear) weights differ per head, so the tests see them.
    for layer in model.model.layers:
        for factors in (getattr(layer.mixer, "window_factors", None), getattr(layer.mixer, "linear_factors", None)):
            if factors is not None:
                torch.nn.init.normal_(factors)
    return model


def random_ids(batch, length, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def assert_close(actual, expected, tol=1e-9):
    scale = expected.abs().max().clamp_min(1e-12)
    assert (actual - expected).abs().max() / scale < tol, (actual - expected).abs().max()


@pytest.mark.parametrize("name", FORWARD_STACKS)
def test_stepwise_decoding_equals_full_forward(name):
    """Prefill (parallel form) + chunked prefill + token-by-token decode (recurrent form) == one full forward."""
    model = tiny_model(name)
    ids = random_ids(2, 40)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = BasedCache(model.config)
        pieces = [model(ids[:, :13], cache=cache).logits, model(ids[:, 13:20], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(20, 40)]
    assert_close(torch.cat(pieces, dim=1), full)
    assert cache.get_seq_length() == 40


@pytest.mark.parametrize("prompt", [2, 12])
def test_decode_steps_skip_the_sink_bookkeeping_once_every_sink_is_cached(prompt):
    """A prompt that fills the sinks (12 tokens: 3 sinks + a window of 4) lets the decode steps reuse the cached sinks
    as they are; a shorter one (2) leaves the steps to fill them. Both decode like the full forward."""
    model = tiny_model("hybrid_sinks")
    ids = random_ids(2, 20)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = BasedCache(model.config)
        pieces = [model(ids[:, :prompt], cache=cache).logits]
        assert cache.layers[0].sinks_full == (prompt >= 3 + WINDOW - 1)
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(prompt, 20)]
    assert_close(torch.cat(pieces, dim=1), full)
    assert cache.layers[0].sink_mask.all()


def test_attention_sinks_change_only_positions_beyond_the_window():
    """The same weights with and without sinks: equal logits while every key is in the window, different after."""
    model = tiny_model("hybrid_sinks")
    plain = BasedForCausalLM(tiny_config(**{**STACKS["hybrid_sinks"], "hybrid_attention_sinks": 0})).double().eval()
    plain.load_state_dict(model.state_dict())
    ids = random_ids(2, 30)
    with torch.no_grad():
        with_sinks, without = model(ids).logits, plain(ids).logits
    assert_close(with_sinks[:, :WINDOW], without[:, :WINDOW])
    assert (with_sinks[:, WINDOW + 1 :] - without[:, WINDOW + 1 :]).abs().amax(-1).min() > 1e-6


def test_retrieval_keys_covering_the_prompt_make_generation_full_attention():
    """A hybrid layer without a linear term whose retrieval slots can hold every older prompt key generates what full
    softmax attention with the same weights does (the window factor cancels), on left-padded rows, while the
    window's keys are the prompt's; without retrieval keys the logits differ (so the test can fail). One layer: the
    prompt's earlier queries do not see the retrieval keys, so a second layer's keys would differ from full
    attention's."""
    hybrid = dict(mixer_types=["hybrid_attention"], hybrid_attention_sinks=2, hybrid_linear_factor_init=0)
    torch.manual_seed(0)
    retrieving = BasedForCausalLM(tiny_config(**hybrid, hybrid_retrieval_keys=30)).double().eval()
    plain = BasedForCausalLM(tiny_config(**hybrid)).double().eval()
    full = BasedForCausalLM(tiny_config(mixer_types=["full_attention"])).double().eval()
    plain.load_state_dict(retrieving.state_dict())
    assert set(full.load_state_dict(retrieving.state_dict(), strict=False).unexpected_keys) == {
        "model.layers.0.self_attn.window_factors"
    }
    ids, mask = random_ids(2, 24), torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    # Two new tokens: the second step's window still holds the prompt's last keys.
    generate = dict(attention_mask=mask, max_new_tokens=2, do_sample=False, output_logits=True)
    outputs = [m.generate(ids, return_dict_in_generate=True, **generate) for m in (retrieving, full, plain)]
    (retrieved, expected, without) = [torch.stack(out.logits, 1) for out in outputs]
    assert_close(retrieved, expected)
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert (without - expected).abs().amax() > 1e-3


def test_only_the_last_window_of_a_prefill_sees_its_retrieval_keys():
    """In a prefill the last RETRIEVAL_QUERIES queries choose the retrieval keys and the last window of queries (or
    the choosing ones, if more) sees them; the earlier ones see the window and sinks alone, as without retrieval
    keys, so their outputs do not depend on later tokens."""
    model = tiny_model("hybrid_retrieval")
    plain = BasedForCausalLM(tiny_config(**{**STACKS["hybrid_retrieval"], "hybrid_retrieval_keys": 0})).double()
    plain.load_state_dict(model.state_dict())
    ids = random_ids(2, 30)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % VOCAB  # a different last token: other queries, maybe other keys chosen
    earlier = 30 - max(WINDOW, RETRIEVAL_QUERIES)
    with torch.no_grad():
        logits, other, without = (
            m(x, use_cache=True).logits for m, x in ((model, ids), (model, changed), (plain, ids))
        )
    assert_close(logits[:, :earlier], without[:, :earlier])
    assert_close(other[:, :earlier], logits[:, :earlier])
    assert (logits[:, earlier:] - without[:, earlier:]).abs().amax() > 1e-6


def test_retrieval_slots_keep_the_best_scored_keys_that_leave_the_window():
    """The slots take the best-scored real keys among those leaving the window that are not sinks; a decode step
    sees them; a later multi-token update chooses again among the kept and the leaving keys."""
    layer = BasedHybridLayer(sliding_window=3, sinks=1, retrieval=2)
    keys = torch.arange(16.0).view(2, 8, 1, 1)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5] = False
    scores = torch.tensor([[9.0, 5, 1, 7, 0, 8, 9, 9], [9, 5, 1, 7, 0, 8, 9, 9]])
    # Leaving the window: keys 0-5; 0 is the sink; row 1's key 5 is padding.
    _, _, _, kept = layer.update_with_sinks(keys, -keys, mask, lambda k, m: scores)
    # Before the choice only the sinks are kept; the choosing queries see the sinks and the chosen keys (a first
    # prefill lists them by position, the slots' order).
    assert kept.by_position and kept.sinks.tolist() == [[0], [0]] and kept.count == 1
    assert kept.chosen.sort(1).values.tolist() == [[0, 3, 5], [0, 1, 3]]
    assert layer.sink_keys[:, :, 0, 0].tolist() == [[0, 5, 3], [8, 11, 9]]
    assert torch.equal(layer.sink_values, -layer.sink_keys) and layer.sink_mask.all()
    new = torch.full((2, 1, 1, 1), 50.0)
    step_keys, _, _, step_kept = layer.update_with_sinks(new, -new, torch.ones(2, 1, dtype=torch.bool))
    assert torch.equal(step_keys[:, :3], layer.sink_keys) and step_kept.chosen is None
    assert (
        not step_kept.by_position
        and step_kept.sinks.tolist() == [[True] * 3 + [False] * 3] * 2
        and step_kept.count == 3
    )
    # Slots, window (6, 7 then 7, 50), 2 new keys: the choice is among slots 1-2 and keys 7, 50, 60 (leaving).
    new = torch.tensor([60.0, 70.0]).view(1, 2, 1, 1).expand(2, -1, -1, -1)
    rescored = torch.tensor([[0.0, 1, 9, 0, 8, 0, 0]]).expand(2, -1)
    _, _, _, kept = layer.update_with_sinks(new, -new, torch.ones(2, 2, dtype=torch.bool), lambda k, m: rescored)
    assert layer.sink_keys[:, :, 0, 0].tolist() == [[0, 3, 50], [8, 9, 50]]
    # Until the new choice the update's queries see the earlier slots; the choosing ones see the new slots.
    assert kept.sinks.tolist() == [[True] * 3 + [False] * 4] * 2
    assert kept.chosen.tolist() == [[True, False, True, False, True, False, False]] * 2  # the sink, keys 3 and 50


def test_a_vanishing_linear_factor_leaves_the_sliding_window():
    """Linear factor 0 (no linear term) or ~0: the hybrid layers compute what sliding-window softmax attention does
    (the window factor then cancels out); at 0.3 they do not."""
    window = BasedForCausalLM(tiny_config(**STACKS["sliding_window"])).double().eval()
    ids = random_ids(2, 30)
    for factor, same in ((0, True), (1e-15, True), (0.3, False)):
        overrides = {"hybrid_linear_factor_init": factor, "hybrid_attention_sinks": 0}
        hybrid = BasedForCausalLM(tiny_config(**{**STACKS["hybrid_linear_factor"], **overrides})).double()
        missing = hybrid.load_state_dict(window.state_dict(), strict=False).missing_keys
        assert all("feature_map" in n or "_factors" in n for n in missing)
        assert any("linear_factors" in n for n in missing) == (factor != 0)
        with torch.no_grad():
            expected, actual = window(ids).logits, hybrid.eval()(ids).logits
        assert (actual - expected).abs().max() < 1e-9 if same else (actual - expected).abs().max() > 1e-3


def test_hybrid_decode_step_maps_only_the_key_that_leaves_the_window():
    model = tiny_model("hybrid_hedgehog")
    mapped = []
    model.model.layers[0].mixer.feature_map_k.register_forward_hook(
        lambda module, args, out: mapped.append(out.shape[1])
    )
    ids = random_ids(1, 12)
    with torch.no_grad():
        cache = BasedCache(model.config)
        model(ids[:, :11], cache=cache)
        model(ids[:, 11:], cache=cache)
    # The prefill (into an empty cache: no slots before its keys) maps all but the last window - 1 of its 11 keys.
    assert mapped == [11 - (WINDOW - 1), 1]


@pytest.mark.parametrize("name", FORWARD_STACKS)
def test_generated_logits_equal_full_forward(name):
    model = tiny_model(name)
    prompt = random_ids(1, 9)
    with torch.no_grad():
        out = model.generate(
            prompt,
            max_new_tokens=130,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
        full = model(out.sequences, use_cache=False).logits
    generated = torch.stack(out.logits, dim=1)  # logits that produced tokens 9..138; generate() stores them in fp32
    assert generated.shape[1] == 130
    assert_close(generated.double(), full[:, 8:-1], tol=1e-6)


@pytest.mark.parametrize("name", STACKS)
def test_left_padded_batch_equals_sequences_alone(name):
    model = tiny_model(name)
    lengths = [11, 4, 8]
    rows = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = random_ids(len(rows), width, seed=99)  # padded positions hold real tokens: only the mask hides them
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    settings = dict(
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **settings)
        prefill = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model.generate(row[None], **settings)
            assert torch.equal(batched.sequences[i, width:], alone.sequences[0, len(row) :])
            assert_close(torch.stack(batched.logits, 1)[i], torch.stack(alone.logits, 1)[0], tol=1e-6)
            assert_close(prefill[i, width - len(row) :], model(row[None]).logits[0], tol=1e-8)


def test_right_padding_leaves_real_positions_unchanged():
    """lm-eval right-pads loglikelihood batches and passes no mask: causal models must ignore the padding."""
    model = tiny_model("based_mix")
    ids = random_ids(1, 10)
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert_close(model(padded).logits[:, :10], model(ids).logits)


@pytest.mark.parametrize("name", CONSTANT_STATE_STACKS)
def test_cache_size_is_constant(name):
    model = tiny_model(name, dtype=torch.float32)
    prompt = random_ids(2, 6)
    sizes = {}
    with torch.no_grad():
        for steps in (32, 128):
            cache = BasedCache(model.config)
            model.generate(
                prompt,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                pad_token_id=0,
                **{CACHE_FIELD: cache},
            )
            assert cache.get_seq_length() == 6 + steps - 1  # the last token is sampled, never fed back
            sizes[steps] = cache.nbytes()
    assert sizes[32] == sizes[128] > 0


@pytest.mark.parametrize("name", CONSTANT_STATE_STACKS)
def test_cache_updates_states_in_place(name):
    """After the prefill every state keeps its address (what a CUDA graph replays): through decode steps, a batch-1
    prefill widened to 3 rows, and beam reordering; the logits equal those of a cache filled by a batch-3 prefill."""
    model = tiny_model(name)
    prompt, steps = random_ids(1, 9), random_ids(3, 6, seed=2)
    with torch.no_grad():
        widened = BasedCache(model.config)
        model(prompt, cache=widened)
        widened.batch_repeat_interleave(3)
        plain = BasedCache(model.config)
        model(prompt.expand(3, -1), cache=plain)
        addresses = {
            (i, n): t.data_ptr() for i, layer in enumerate(widened.layers) for n, t in layer.named_tensors().items()
        }
        for t in range(steps.shape[1]):
            assert_close(
                model(steps[:, t : t + 1], cache=widened).logits,
                model(steps[:, t : t + 1], cache=plain).logits,
                tol=1e-12,
            )
        expected = {key: widened.layers[key[0]].named_tensors()[key[1]][[2, 0, 1]].clone() for key in addresses}
        widened.reorder_cache(torch.tensor([2, 0, 1]))
    assert widened.is_static and len(addresses) > 0
    for (i, n), address in addresses.items():
        tensor = widened.layers[i].named_tensors()[n]
        assert tensor.data_ptr() == address, (i, n)
        assert torch.equal(tensor, expected[i, n]), (i, n)


def test_cache_layers():
    """One transformers cache layer per model layer, holding the states named and shaped as the kernels take them."""
    from transformers.cache_utils import CacheLayerMixin, LinearAttentionLayer

    model = tiny_model("based_mix", dtype=torch.float32)
    config = model.config
    cache = BasedCache(config)
    assert len(cache) == 4 and all(layer.named_tensors() == {} for layer in cache.layers)
    with torch.no_grad():
        model(random_ids(2, 7), cache=cache)
    conv, linear, window, _ = cache.layers
    assert isinstance(conv, LinearAttentionLayer) and isinstance(linear, LinearAttentionLayer)
    assert isinstance(window, CacheLayerMixin)
    heads, features = config.num_attention_heads, 1 + config.feature_dim + config.feature_dim**2
    assert {n: tuple(t.shape) for n, t in conv.named_tensors().items()} == {
        "conv": (2, config.conv_kernel_size - 1, config.conv_intermediate_size)
    }
    assert {n: (tuple(t.shape), t.dtype) for n, t in linear.named_tensors().items()} == {
        "kv": ((2, heads, features, config.head_dim), torch.float32),
        "z": ((2, heads, features), torch.float32),
    }
    kv_heads = config.num_key_value_heads
    assert {n: tuple(t.shape) for n, t in window.named_tensors().items()} == {
        "key": (2, WINDOW - 1, kv_heads, config.head_dim),
        "value": (2, WINDOW - 1, kv_heads, config.head_dim),
        "key_mask": (2, WINDOW - 1),
    }
    assert cache.nbytes() == sum(layer.nbytes() for layer in cache.layers) > 0
    with pytest.raises(NotImplementedError, match="cannot be rolled back"):
        cache.crop(3)

    hybrid, full = BasedCache(tiny_model("lolcats_mix").config).layers
    assert isinstance(hybrid, LinearAttentionLayer) and isinstance(hybrid, CacheLayerMixin)
    assert not full.is_compileable and hybrid.is_compileable


def test_a_first_prefill_without_padding_runs_softmax_layers_without_a_key_mask():
    """A first update of the cache whose attention mask marks every token real: the softmax layer gets no key mask
    (plain causal attention: SDPA's is_causal on a GPU) and gives the logits it gives with the mask; a padded batch
    and later updates keep their masks."""
    model = tiny_model("lolcats_mix")
    ids, ones = random_ids(2, 9), torch.ones(2, 9, dtype=torch.long)
    padded = ones.clone()
    padded[1, :3] = 0
    unmasked = []

    def spy(q, k, v, window=None, key_mask=None, scale=None):
        unmasked.append(key_mask is None)
        return softmax_attention(q, k, v, window=window, key_mask=key_mask, scale=scale)

    with torch.no_grad(), patch.object(modeling_based, "softmax_attention", spy):
        dense = model(ids, attention_mask=ones, cache=(cache := BasedCache(model.config)))
        model(ids[:, :1], attention_mask=torch.ones(2, 10, dtype=torch.long), cache=cache)
        model(ids, attention_mask=padded, cache=BasedCache(model.config))
        with patch.object(modeling_based, "all_real", return_value=False):
            masked = model(ids, attention_mask=ones, cache=BasedCache(model.config))
    assert unmasked == [True, False, False, False]
    assert_close(dense.logits, masked.logits)


@pytest.mark.parametrize("name", ["based_mix", "lolcats_mix"])
def test_reset_cache_decodes_like_a_new_one(name):
    model = tiny_model(name)
    ids = random_ids(2, 12)
    with torch.no_grad():
        expected = [model(ids[:, :8], cache=(new := BasedCache(model.config))).logits]
        expected += [model(ids[:, t : t + 1], cache=new).logits for t in range(8, 12)]
        cache = BasedCache(model.config)
        model(random_ids(2, 10, seed=5), cache=cache)
        cache.reset()
        assert cache.get_seq_length() == 0
        actual = [model(ids[:, :8], cache=cache).logits] + [
            model(ids[:, t : t + 1], cache=cache).logits for t in range(8, 12)
        ]
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)
    assert cache.get_seq_length() == 12
    assert BasedCache(model.config).is_static == (name == "based_mix")


@pytest.mark.parametrize("name", STACKS)
def test_static_cache_generate_equals_dynamic_and_full_forward(name):
    """generate(cache_implementation="static") == the default cache == one forward over the result (tokens and
    logits), on a left-padded batch, greedy and with beam search; its cache is static and allocated once."""
    model = tiny_model(name)
    ids, mask = random_ids(2, 9), torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad():
        runs = {
            (implementation, beams): model.generate(
                ids,
                attention_mask=mask,
                cache_implementation=implementation,
                num_beams=beams,
                output_logits=True,
                **settings,
            )
            for implementation in ("dynamic", "static")
            for beams in (1, 3)
        }
        dynamic, static = runs["dynamic", 1], runs["static", 1]
        full_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], 1)
        full = model(static.sequences, attention_mask=full_mask, use_cache=False).logits
    assert torch.equal(static.sequences, dynamic.sequences)
    assert torch.equal(runs["static", 3].sequences, runs["dynamic", 3].sequences)
    assert_close(torch.stack(static.logits, 1), torch.stack(dynamic.logits, 1), tol=1e-12)
    assert_close(torch.stack(static.logits, 1)[1].double(), full[1, 8:-1], tol=1e-6)
    cache = getattr(static, CACHE_FIELD)
    assert cache.is_static and cache.is_compileable and cache.max_cache_len >= 16  # the last token is not fed back
    assert not getattr(dynamic, CACHE_FIELD).is_compileable


def test_static_full_attention_layer_writes_in_place_and_refuses_overflow():
    model = tiny_model("lolcats_mix")
    cache = BasedCache(model.config, max_cache_len=12)
    ids = random_ids(2, 12)
    with torch.no_grad():
        model(ids[:, :9], cache=cache)
        addresses = {n: t.data_ptr() for n, t in cache.layers[1].named_tensors().items()}
        logits = [model(ids[:, t : t + 1], cache=cache).logits for t in range(9, 12)]
        with pytest.raises(ValueError, match="holds 12 positions and this call would take it to 13"):
            model(ids[:, :1], cache=cache)
    assert {n: t.data_ptr() for n, t in cache.layers[1].named_tensors().items()} == addresses
    assert cache.layers[1].keys.shape[1] == 12 and cache.is_static
    with torch.no_grad():
        assert_close(torch.cat(logits, 1), model(ids, use_cache=False).logits[:, 9:])


def test_generate_refuses_a_cache_implementation_it_does_not_have():
    with pytest.raises(ValueError, match="cache_implementation='quantized' is not supported by BASED-family models"):
        tiny_model("based_mix").generate(random_ids(1, 4), max_new_tokens=2, cache_implementation="quantized")


COMPILED_STACKS = [
    "based_mix",
    "lolcats_mix",
    "hybrid_taylor",
    "linear_taylor",
    "hybrid_sinks",
    "hybrid_no_linear",
    "hybrid_retrieval",
]


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", COMPILED_STACKS)
def test_compiled_decoding_gives_the_same_tokens(name, batch):
    """With a compile_config, transformers compiles the decoding step of a static-cache generation (here on the CPU,
    where it compiles only when told to): one graph for every step (fullgraph, no recompile as the positions advance),
    each kernel one custom op in it, no Python int among its inputs (CUDA graphs would re-capture for each value), and
    the same tokens as the eager steps. The traced step never asks for the device's kernels (`use_triton`): on CUDA
    that test breaks the graph, and the step then recompiles for every layer."""
    from transformers import CompileConfig

    def use_triton_outside_the_graph(x):
        assert not torch.compiler.is_compiling(), "use_triton traced"
        return False

    model = tiny_model(name, dtype=torch.float32)
    ids, mask = random_ids(batch, 7), torch.ones(batch, 7, dtype=torch.long)
    mask[-1, :3] = 0
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(ids, attention_mask=mask, **settings)
        assert not hasattr(model, "_compiled_call")  # only with a compile_config
        with (
            patch.object(CompileConfig, "to_dict", lambda self: dict(fullgraph=True, backend=backend)),
            torch._dynamo.config.patch(error_on_recompile=True),
            patch("hf_based.kernels.dispatch.use_triton", use_triton_outside_the_graph),
        ):
            compiled = model.generate(ids, attention_mask=mask, compile_config=compile_config, **settings)
    assert torch.equal(compiled, eager)
    (graph,) = graphs
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert any(op.startswith("hf_based.") for op in ops), ops
    inputs = [node.meta["example_value"] for node in graph.graph.nodes if node.op == "placeholder"]
    assert all(isinstance(value, torch.Tensor) for value in inputs)


def test_custom_ops_match_their_fakes():
    """The custom ops that torch.compile sees: shapes, dtypes and strides of the fake implementations are those of
    the real ones (torch.library.opcheck), on a decode step with states."""
    gen = torch.Generator().manual_seed(0)
    b, h, d, dv, f = 2, 3, 4, 5, 6

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = randn(b, 1, h, d), randn(b, 9, h, d), randn(b, 9, h, dv)
    mask = torch.ones(b, 9, dtype=torch.bool)
    mask[0, :3] = False
    q_feat, k_feat = randn(b, 1, h, f).exp(), randn(b, 9, h, f).exp()
    taylor_features = 1 + d + d * d
    cases = {
        "softmax_attention": (q, k, v, None, mask, None),
        "hybrid_attention_recurrent": (
            q,
            k,
            v,
            q_feat,
            k_feat,
            torch.rand(h, generator=gen),
            4,
            mask,
            randn(b, h, f, dv),
            randn(b, h, f).exp(),
            None,
            mask & (mask.cumsum(1) <= 2),
        ),
        "taylor_linear_attention_recurrent": (
            q,
            k[:, :1],
            v[:, :1],
            mask[:, :1],
            randn(b, h, taylor_features, dv),
            randn(b, h, taylor_features).exp(),
            1e-12,
        ),
        "linear_attention_recurrent": (
            q_feat,
            k_feat[:, :1],
            v[:, :1],
            None,
            randn(b, h, f, dv),
            randn(b, h, f).exp(),
            1e-12,
        ),
        "short_conv_recurrent": (randn(b, 1, 7), randn(7, 4), None, randn(b, 3, 7)),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.hf_based, name), args, test_utils=("test_schema", "test_faketensor"))


def test_full_attention_cache_grows():
    model = tiny_model("full_attention", dtype=torch.float32)
    cache = BasedCache(model.config)
    with torch.no_grad():
        model(random_ids(1, 4), cache=cache)
        before = cache.nbytes()
        model(random_ids(1, 1), cache=cache)
    assert cache.nbytes() > before


def test_generation_modes():
    model = tiny_model("based_mix", dtype=torch.float32)
    prompt = random_ids(2, 7)
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        torch.manual_seed(0)
        sampled = model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0)
        beams = model.generate(
            prompt,
            max_new_tokens=10,
            num_beams=3,
            num_return_sequences=2,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert greedy.shape == sampled.shape == (2, 17)
    assert beams.sequences.shape == (4, 17)
    # The best beam's sequence score must be at least that of greedy decoding (beam search explores a superset).
    with torch.no_grad():

        def log_prob(seq):
            logits = model(seq[None]).logits[0, 6:-1].log_softmax(-1)
            return logits.gather(-1, seq[7:, None]).sum()

        assert log_prob(beams.sequences[0]) >= log_prob(greedy[0]) - 1e-4


def test_beam_search_reorders_cache():
    """Beam search with a cache must give the same sequences as recomputing every beam from scratch."""
    model = tiny_model("hybrid_hedgehog", dtype=torch.float64)
    prompt = random_ids(1, 6)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, num_beams=4, do_sample=False, pad_token_id=0)
        uncached = model.generate(
            prompt, max_new_tokens=8, num_beams=4, do_sample=False, pad_token_id=0, use_cache=False
        )
    assert torch.equal(cached, uncached)


def test_streaming_generation():
    from transformers import TextStreamer

    from hf_based.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = BasedForCausalLM(preset_config("tiny")).eval()
    streamed = []

    class Collector(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            streamed.append(text)

    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=8,
            do_sample=False,
            streamer=Collector(tokenizer, skip_prompt=True),
            pad_token_id=tokenizer.eos_token_id,
        )
    assert "".join(streamed) == tokenizer.decode(out[0, ids.shape[1] :])


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model("lolcats_mix", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is BasedForCausalLM
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = random_ids(2, 12)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied


def test_untied_embeddings_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BasedForCausalLM(tiny_config(mixer_types=["base_conv"], tie_word_embeddings=False))
    model.save_pretrained(tmp_path)
    loaded = BasedForCausalLM.from_pretrained(tmp_path)
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_remote_code_load_in_fresh_process(tmp_path):
    model = tiny_model("based_mix", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    ids = random_ids(1, 8)
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        assert "hf_based" not in sys.modules
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            assert torch.equal(model(data["ids"]).logits, data["logits"])
        print(type(model).__module__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hf_based.modeling.modeling_based"
    config = (tmp_path / "config.json").read_text()
    assert '"AutoModelForCausalLM": "modeling_based.BasedForCausalLM"' in config


def test_training_step_reduces_loss():
    model = tiny_model("lolcats_mix", dtype=torch.float32).train()
    ids = random_ids(4, 24)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_gradient_checkpointing_matches_plain_backward():
    model = tiny_model("based_mix", dtype=torch.float64).train()
    ids = random_ids(2, 16)
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert_close(param.grad, plain[name], tol=1e-9)


def test_peft_lora_wraps_and_trains():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("lolcats_mix", dtype=torch.float32).train()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    lora_names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert lora_names and all("lora_" in n for n in lora_names)
    assert sum("q_proj.lora_A" in n for n in lora_names) == 2
    ids = random_ids(2, 16)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    merged = peft_model.merge_and_unload()
    assert type(merged) is BasedForCausalLM
    with torch.no_grad():
        assert_close(merged(ids).logits.double(), peft_model(input_ids=ids).logits.double(), tol=1e-5)


def test_presets_shapes():
    config = preset_config("based-360m")
    assert config.mixer_types.count("linear_attention") == 5
    assert config.mixer_types.count("sliding_window_attention") == 5
    assert config.mixer_types.count("base_conv") == 17
    assert config.mixer_types[1] == "linear_attention" and config.mixer_types[2] == "sliding_window_attention"
    assert (config.vocab_size, config.hidden_size, config.head_dim, config.sliding_window) == (50264, 1024, 64, 129)
    assert config.linear_attention_eps == 1e-6  # trained with fla parallel_based's denominator eps
    with torch.device("meta"):
        params = sum(p.numel() for p in BasedForCausalLM(config).parameters())
    assert 340e6 < params < 380e6, params
    big = preset_config("based-1.3b")
    assert (big.hidden_size, big.num_hidden_layers, big.head_dim) == (1792, 36, 112)
    assert big.mixer_types.count("linear_attention") == 7
    assert big.linear_attention_eps == 1e-12  # based-1b trained on the PyTorch path


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(mixer_types=["linear_attention", "mamba"]),
            r"mixer_types\[1\]='mamba'.*accepted mixers: linear_attention",
        ),
        (dict(mixer_types=["base_conv"], num_hidden_layers=3), r"mixer_types has 1 entries but num_hidden_layers=3"),
        (
            dict(mixer_types=["base_conv"], hidden_size=30, num_attention_heads=4),
            r"hidden_size=30.*num_attention_heads=4",
        ),
        (dict(mixer_types=["base_conv"], num_key_value_heads=3), r"num_key_value_heads=3"),
        (dict(mixer_types=["sliding_window_attention"], sliding_window=0), r"sliding_window=0.*integers >= 1"),
        (dict(mixer_types=["base_conv"], feature_map="elu"), r"feature_map='elu'.*'taylor', 'hedgehog'"),
        (dict(mixer_types=["base_conv"], linear_attention_projections="x"), r"'based', 'llama'"),
    ],
)
def test_bad_config_raises(overrides, message):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4)
    base.update(overrides)
    base.setdefault("num_hidden_layers", len(base["mixer_types"]))
    with pytest.raises(ValueError, match=message):
        BasedConfig(**base)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match=r"preset='huge'.*'tiny', 'based-360m', 'based-1.3b'"):
        preset_config("huge")


def test_bad_inputs_raise():
    model = tiny_model("based_mix", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"input_ids must have shape \[batch, time\], got \(2, 3, 4\)"):
        model(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must be a 2D padding mask.*got shape \(2, 3\)"):
        model(random_ids(2, 5), attention_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="cache must be a BasedCache"):
        from transformers import DynamicCache

        model(random_ids(2, 5), cache=DynamicCache())


def test_prefill_graphs_refuse_a_cpu_model_and_a_bad_shape_count():
    model = tiny_model("hybrid_sinks")
    with pytest.raises(ValueError, match="prefill graphs need a model on a CUDA device, got one on cpu"):
        model.enable_prefill_graphs()
    with pytest.raises(ValueError, match="max_shapes must be an int >= 1"):
        model.enable_prefill_graphs(max_shapes=0)


def test_prefill_graphs_serve_a_mask_of_ones_as_no_mask():
    """The graphs' key: a mask of ones is the unmasked prefill's (the eager forward drops it; a capture could not read
    it), a padded mask of that shape its own."""
    ids, ones = random_ids(2, 9), torch.ones(2, 9, dtype=torch.long)
    padded = ones.clone()
    padded[0, 0] = 0
    keys = [PrefillGraphs._key(ids, mask, None, 1) for mask in (None, ones, padded)]
    assert keys[0] == keys[1] != keys[2]


def test_copied_cache_layers_hold_their_own_equal_tensors():
    model = tiny_model("hybrid_sinks")
    with torch.no_grad():
        cache = model(input_ids=torch.randint(3, VOCAB, (2, 40)), use_cache=True).past_key_values
    copies = copy_layers(cache.layers)
    for layer, copied in zip(cache.layers, copies, strict=True):
        original = layer.named_tensors()
        assert original.keys() == copied.named_tensors().keys()
        for name, tensor in copied.named_tensors().items():
            assert torch.equal(tensor, original[name])
            if tensor.numel():
                assert tensor.data_ptr() != original[name].data_ptr()
        assert vars(copied).keys() == vars(layer).keys()
