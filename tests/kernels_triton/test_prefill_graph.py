"""A converted model's prefill through its cache reads nothing on the host, so it can be captured in a CUDA graph:
replays give the eager prefill's logits and cache, for the tokens in the input buffer. GPU only (CUDA graphs)."""

import pytest
import torch
from triton_helpers import INTERPRET

from hf_based.bench.throughput import capture
from hf_based.modeling import BasedConfig, BasedForCausalLM

pytestmark = pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")


def test_prefill_with_sinks_and_retrieval_slots_replays_as_a_cuda_graph():
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
    model = BasedForCausalLM(config).cuda().to(torch.bfloat16).eval()
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
