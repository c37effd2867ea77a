"""Generation cache for BASED-family models.

Every layer keeps a small dict of tensors whose size does not grow with the generated length, except
`full_attention` layers, which keep an ordinary KV cache:

    linear_attention          kv [B, H, F, Dv], z [B, H, F] (fp32)
    sliding_window_attention  key/value [B, window-1, Hkv, D] + key_mask [B, window-1]: the keys that, with the
                              next token, make up its window (slots not yet filled are masked out)
    hybrid_attention          the sliding-window buffer + kv/z of every key that has left the window
    base_conv                 conv [B, K-1, C]: the last K-1 conv inputs
    full_attention            key/value/key_mask growing along time

Padded prompt positions never enter a state: the mixers mask them, and the key masks ride along in the buffers.
"""

import torch
from transformers.cache_utils import Cache


class BasedCache(Cache):
    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.states: list[dict[str, torch.Tensor] | None] = [None] * num_layers
        self.seen_tokens = 0  # positions consumed so far, padding included

    def __len__(self) -> int:
        return len(self.states)

    def __repr__(self) -> str:
        return f"BasedCache(layers={len(self.states)}, seen_tokens={self.seen_tokens}, bytes={self.nbytes()})"

    def layer_state(self, layer_idx: int) -> dict[str, torch.Tensor] | None:
        return self.states[layer_idx]

    def update_layer_state(self, layer_idx: int, **tensors: torch.Tensor) -> None:
        self.states[layer_idx] = {**(self.states[layer_idx] or {}), **tensors}

    def extend_keys(self, layer_idx, key, value, key_mask, keep=None):
        """Prepend the cached keys/values of `layer_idx` to the new ones and store the result.

        key/value: [B, T, Hkv, D]; key_mask: [B, T] bool. `keep` = how many of the most recent keys to store
        (window - 1 for sliding windows, as a fixed-size buffer even before it fills up); None stores all of them.
        Returns the keys, values and key mask that the new queries attend to.
        """
        state = self.states[layer_idx]
        if state is None and keep is not None:
            batch, _, heads, dim = key.shape
            state = {
                "key": key.new_zeros(batch, keep, heads, dim),
                "value": value.new_zeros(batch, keep, heads, value.shape[-1]),
                "key_mask": key_mask.new_zeros(batch, keep),
            }
        if state is not None:
            key = torch.cat([state["key"], key], dim=1)
            value = torch.cat([state["value"], value], dim=1)
            key_mask = torch.cat([state["key_mask"], key_mask], dim=1)
        start = 0 if keep is None else key.shape[1] - keep
        self.update_layer_state(layer_idx, key=key[:, start:], value=value[:, start:], key_mask=key_mask[:, start:])
        return key, value, key_mask

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for state in self.states:
            if state is not None:
                for name, tensor in state.items():
                    state[name] = tensor.index_select(0, beam_idx.to(tensor.device))

    def reset(self) -> None:
        self.states = [None] * len(self.states)
        self.seen_tokens = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("BasedCache holds recurrent states, which cannot be rolled back")

    def nbytes(self) -> int:
        """Bytes held by all layer states."""
        return sum(t.numel() * t.element_size() for s in self.states if s is not None for t in s.values())

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def is_linear(self) -> list[bool]:
        # False everywhere so that generate() asks get_seq_length() (our token counter) like for attention caches.
        return [False] * len(self.states)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.states)
