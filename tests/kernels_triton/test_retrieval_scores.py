"""The Triton retrieval-score kernels against the reference (fp64 ground truth), under the interpreter on the CPU."""

import pytest
import torch
from triton_helpers import DEVICE, INTERPRET, Rand, left_padding_mask

from hf_based.kernels.retrieval import triton as retrieval
from hf_based.kernels.retrieval.reference import retrieval_scores as reference
from hf_based.kernels.softmax.triton import split_range as retrieval_split_range


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch, queries, keys, heads, kv_heads, dim, padded",
    [
        (1, 1, 1, 1, 1, 16, False),
        (2, 7, 7, 3, 1, 32, True),
        (1, 63, 300, 9, 3, 64, False),
        (2, 20, 130, 2, 2, 24, True),
        (1, 5, 600, 1, 1, 16, True),  # keys in 2 parts (the interpreter counts as 4 SMs)
        (1, 33, 1100, 2, 1, 32, False),  # 4 parts
    ],
)
def test_retrieval_scores_match_reference(monkeypatch, batch, queries, keys, heads, kv_heads, dim, padded, dtype):
    parts = []
    monkeypatch.setattr(retrieval, "split_range", lambda *a: parts.append(retrieval_split_range(*a)) or parts[-1])
    rand = Rand(keys)
    q, k = rand.normal(batch, queries, heads, dim) * 2, rand.normal(batch, keys, kv_heads, dim) * 2
    mask = left_padding_mask(keys)[:batch] if padded else None
    scores = retrieval.retrieval_scores(q.to(dtype), k.to(dtype), mask)
    truth = reference(q.double(), k.double(), mask)
    assert scores.dtype == torch.float32 and scores.shape == (batch, keys)
    torch.testing.assert_close(scores.double(), truth, atol=1e-5 if dtype == torch.float32 else 5e-3, rtol=1e-3)
    # Each query row's weights sum to 1 (none for rows without a visible key): the scores are not all zero.
    assert scores.max() > 0
    if INTERPRET:  # a GPU splits by its own SM count
        assert parts[0][0] == {600: 2, 1100: 4}.get(keys, 1)


def test_retrieval_scores_with_every_key_masked_are_zero():
    rand = Rand(3)
    mask = torch.zeros(1, 40, dtype=torch.bool, device=DEVICE)
    scores = retrieval.retrieval_scores(rand.normal(1, 5, 2, 16), rand.normal(1, 40, 2, 16), mask)
    assert torch.equal(scores.cpu(), torch.zeros(1, 40))
