"""benchmarks/recall_key_choice_probe.py: its rules take the keys they say, and never sinks or window keys."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recall_key_choice_probe.py"
spec = importlib.util.spec_from_file_location("recall_key_choice_probe", SCRIPT)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_best_and_sum_rules_disagree_where_they_should():
    # 2 heads, 4 queries, 40 keys: query 0 gives key 20 weight 0.9; every query gives key 30 weight 0.3.
    weights = torch.full((2, 4, 40), 0.01, dtype=torch.float64)
    weights[:, 0, 20], weights[:, :, 30] = 0.9, 0.3
    weights[:, :, 0] = weights[:, :, 39] = 5.0  # a sink and a window key: never taken
    best = probe.chosen(weights, (4, "best", 0, 0), sinks=4, window=3, slots=1)
    summed = probe.chosen(weights, (4, "sum", 0, 0), sinks=4, window=3, slots=1)
    assert best.nonzero().flatten().tolist() == [20] and summed.nonzero().flatten().tolist() == [30]
    # The last query alone sees only key 30 score; neighbours come with a scoring key (1 before, 2 after).
    last = probe.chosen(weights, (1, "best", 1, 2), sinks=4, window=3, slots=4)
    assert last.nonzero().flatten().tolist() == [29, 30, 31, 32]
