"""BASED's Taylor feature map phi for linear attention: phi(q).phi(k) stands in for exp(q.k / sqrt(d)). (LoLCATs'
learned hedgehog map, which has a kernel of its own, is in `hedgehog/`.)"""

import math

import torch


def taylor_num_features(d: int) -> int:
    """How many features `taylor_feature_map` makes of d input dims."""
    return 1 + d + d * d


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """BASED's 2nd-order Taylor map: [..., d] -> [..., 1 + d + d*d], such that phi(q).phi(k) = 1 + s + s^2/2 with
    s = q.k / sqrt(d) (Arora et al. 2024). Elementwise products only, so it runs in x's dtype."""
    d = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * d)  # [..., d*d]
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, x2], dim=-1)
