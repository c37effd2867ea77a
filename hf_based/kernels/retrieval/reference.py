"""Retrieval scores: which older keys the last queries of a prompt attend to, for a cache that keeps the best of them
(the hybrid layers' retrieval slots)."""

import torch
import torch.nn.functional as F

from hf_based.kernels.softmax.reference import stable_exp, visible_keys

# A key that scores keeps this many keys before it and after it: a needle is several tokens, and a copy reads what
# followed the text it matched (benchmarks/results/recall/recipes/NOTES.md, run 17, says how these were chosen).
KEPT_BEFORE, KEPT_AFTER = 3, 11
# The prompt's last queries that choose (in a retrieval prompt, the end of its question), each key scored by the most
# attention any of them gives it: a needle that one query reads outranks filler that all of them read a little.
RETRIEVAL_QUERIES = 8


def pool_neighbours(weights: torch.Tensor, before: int = KEPT_BEFORE, after: int = KEPT_AFTER) -> torch.Tensor:
    """[B, Tk] -> [B, Tk]: each key's score is the best among the `after` keys before it, itself and the `before` keys
    after it, so that a key that scores brings the `before` keys before it and the `after` keys after it."""
    padded = F.pad(weights[:, None], (after, before))  # scores are >= 0: zero padding is never the best
    return F.max_pool1d(padded, before + 1 + after, stride=1)[:, 0]


def retrieval_scores(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Tk] fp32: the most softmax attention each key gets from any of the queries q [B, n, H, D] (at the last n
    key positions, causal, over the real keys of key_mask [B, Tk]), summed over the heads, then pooled
    (`pool_neighbours`). k: [B, Tk, Hkv, D], Hkv dividing H."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bihd,bjhd->bhij", q.to(dtype), k.to(dtype)) * q.shape[-1] ** -0.5
    weights = stable_exp(scores, visible_keys(q.shape[1], k.shape[1], None, key_mask, q.device))
    weights = (weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)).amax(2).sum(1)
    return pool_neighbours(weights)
