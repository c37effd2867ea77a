"""Named model sizes and layer layouts (`hf-based init --preset`), as BasedConfig arguments. Plain data: the command
line lists them without importing torch."""


def based_layer_pattern(num_layers: int, linear_layers: list[int], window_layers: list[int]) -> list[str]:
    """BASED's stack: the listed linear-attention and sliding-window layers, every other layer a gated short conv."""
    return [
        "linear_attention" if i in linear_layers else "sliding_window_attention" if i in window_layers else "base_conv"
        for i in range(num_layers)
    ]


PRESETS = {
    # For tests and quick starts: every BASED mixer, small enough for a CPU.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        feature_dim=8,
        sliding_window=16,
        mixer_types=["base_conv", "linear_attention", "sliding_window_attention", "base_conv"],
    ),
    # HazyResearch/based train/configs/experiment/reference/based-360m.yaml; it trains with fla `parallel_based`,
    # whose denominator eps is 1e-6 (based-1b uses the PyTorch path's 1e-12)
    "based-360m": dict(
        hidden_size=1024,
        num_hidden_layers=27,
        num_attention_heads=16,
        feature_dim=16,
        sliding_window=129,
        linear_attention_eps=1e-6,
        mixer_types=based_layer_pattern(27, [1, 6, 11, 16, 21], [2, 7, 12, 17, 22]),
    ),
    # HazyResearch/based train/configs/experiment/reference/based-1b.yaml (the released "based-1b", ~1.3B parameters)
    "based-1.3b": dict(
        hidden_size=1792,
        num_hidden_layers=36,
        num_attention_heads=16,
        feature_dim=16,
        sliding_window=129,
        mixer_types=based_layer_pattern(36, [1, 6, 11, 16, 21, 27, 33], [2, 7, 12, 17, 22, 28, 34]),
    ),
}
