"""A converted model's prefill through its cache reads nothing on the host, so it can be captured in a CUDA graph:
replays give the eager prefill's logits and cache, for the tokens in the input buffer; generate() with the model's
prefill graphs gives the eager tokens. GPU only (CUDA graphs)."""

import pytest
import torch
from triton_helpers import INTERPRET

from hf_based.modeling import BasedConfig, BasedForCausalLM
from hf_based.modeling.prefill_graphs import capture

pytestmark = pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")


def converted_like_model():
    """Window, sinks and retrieval slots in two hybrid layers, a softmax layer between them, bf16 on the GPU."""
    config = BasedConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        mixer_types=["hybrid_attention", "full_attention", "hybrid_attention"],
        sliding_window=16,
        hybrid_attention_sinks=4,
        hybrid_retrieval_keys=8,
        hybrid_linear_factor_init=0,
    )
    torch.manual_seed(0)
    return BasedForCausalLM(config).cuda().to(torch.bfloat16).eval()


def test_prefill_with_sinks_and_retrieval_slots_replays_as_a_cuda_graph():
    model = converted_like_model()
    ids = torch.randint(0, 256, (2, 300), device="cuda")
    outputs = {}

    def prefill():
        outputs["last"] = model(input_ids=ids, use_cache=True, logits_to_keep=1)

    def result():
        out = outputs["last"]
        return [out.logits.clone()] + [
            t.clone() for layer in out.past_key_values.layers for t in layer.named_tensors().values()
        ]

    with torch.no_grad():
        expected = {}
        for seed in (1, 2):
            ids.copy_(torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(seed)))
            prefill()
            expected[seed] = result()
        graph = capture(prefill, torch.device("cuda"))
        for seed in (1, 2):
            ids.copy_(torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(seed)))
            graph.replay()
            for got, want in zip(result(), expected[seed], strict=True):
                torch.testing.assert_close(got, want)
    assert not torch.equal(expected[1][0], expected[2][0])  # other tokens, other logits: the replays differ


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_prefill_graphs_gives_the_eager_tokens(cache, padded):
    """Left padding, or a mask of ones (which the eager prefill drops, and so does the captured one)."""
    model = converted_like_model()
    mask = torch.ones(2, 300, dtype=torch.long, device="cuda")
    if padded:
        mask[1, :120] = 0

    def generate(seed):
        ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(seed)).cuda()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, cache_implementation=cache)  # fmt: skip
        return out.sequences, torch.stack(out.scores)

    expected = {seed: generate(seed) for seed in (1, 2)}
    model.enable_prefill_graphs()
    for seed in (1, 2, 1):  # captured at the first, replayed after
        tokens, scores = generate(seed)
        assert torch.equal(tokens, expected[seed][0])
        torch.testing.assert_close(scores, expected[seed][1])
    # A static cache's prefill runs eagerly (the graphs' cache is a dynamic one): same tokens, nothing captured.
    assert len(model.prefill_graphs.graphs) == {"dynamic": 1, "static": 0}[cache]
