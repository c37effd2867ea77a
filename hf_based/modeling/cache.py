"""Generation cache for BASED-family models, one transformers cache layer per model layer.

Every layer keeps tensors whose size does not grow with the generated length, except `full_attention` layers, which
keep an ordinary KV cache:

    linear_attention          kv [B, H, F, Dv], z [B, H, F] (fp32)
    sliding_window_attention  key/value [B, window-1, Hkv, D] + key_mask [B, window-1]: the keys that, with the
                              next token, make up its window (slots not yet filled are masked out)
    hybrid_attention          the sliding-window buffer + kv/z of every key that has left the window (F = 0:
                              empty, without a linear term), and with attention sinks key/value/key_mask
                              [B, S, Hkv, D] of the sinks that have left it
    base_conv                 conv [B, K-1, C]: the last K-1 conv inputs
    full_attention            key/value/key_mask growing along time

Padded prompt positions never enter a state: the mixers mask them, and the key masks ride along in the buffers.

A layer allocates its tensors at its first update and afterwards writes them in place (`copy_`), as transformers'
linear-attention layers do; every layer but `full_attention` then keeps the same shapes and addresses for the rest of
the generation, so a decode step can be captured in a CUDA graph (`BasedCache.is_static`).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionLayer

from hf_based.kernels.hybrid.chunked import first_positions, gather_keys, gather_sinks
from hf_based.kernels.hybrid.reference import index_mask
from hf_based.modeling.configuration_based import BasedConfig


class BasedLayerMixin:
    """What the cache does with a layer's tensors, whatever transformers layer class holds them."""

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the layer holds, by name; empty before its first update."""
        raise NotImplementedError

    def apply_to_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every tensor the layer holds by `fn(tensor)`."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.named_tensors().values())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # In place, so that the states keep their addresses.
        for tensor in self.named_tensors().values():
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.apply_to_tensors(lambda tensor: tensor.repeat_interleave(repeats, dim=0))


class BasedRecurrentLayer(BasedLayerMixin, LinearAttentionLayer):
    """Fixed-size states carried from step to step: kv/z of linear attention, or the conv inputs of base_conv.

    They are transformers' recurrent states 0, 1, ... (allocated at the first update, then copied into in place).
    The conv state is one too: our conv kernels take and return it whole, time-major [B, K-1, C], where transformers'
    `update_conv_state` appends new inputs along a trailing time dimension.
    """

    def __init__(self, state_names: tuple[str, ...]):
        LinearAttentionLayer.__init__(self, number_of_states=len(state_names))
        self.state_names = state_names

    def state(self) -> tuple[torch.Tensor, ...] | None:
        """The states after the tokens seen so far, in `state_names` order; None before the first update."""
        if not self.has_previous_state[0]:
            return None
        return tuple(self.recurrent_states[i] for i in range(self.number_of_states))

    def update_state(self, *states: torch.Tensor) -> None:
        for i, state in enumerate(states):
            self.update_recurrent_state(state, i)
            self.has_previous_state[i] = True

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {
            name: self.recurrent_states[i]
            for i, name in enumerate(self.state_names)
            if self.is_recurrent_states_initialized[i]
        }

    def apply_to_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for i in range(self.number_of_states):
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = fn(self.recurrent_states[i])


class BasedAttentionLayer(BasedLayerMixin, CacheLayerMixin):
    """`full_attention`: every key/value [B, T, Hkv, D] and its key mask [B, T], growing along time.

    Own class rather than transformers' DynamicLayer: our kernels take time-major keys and a padding mask, where
    DynamicLayer concatenates head-major keys along dim -2 and keeps no mask.
    """

    def __init__(self):
        CacheLayerMixin.__init__(self)
        self.key_mask: torch.Tensor | None = None
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, key_mask: torch.Tensor) -> None:
        self.keys, self.values, self.key_mask = key_states, value_states, key_mask
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new keys/values/key mask; return every key, value and key mask that the new queries attend to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states, key_mask)
            return key_states, value_states, key_mask
        self.keys = torch.cat([self.keys, key_states], dim=1)
        self.values = torch.cat([self.values, value_states], dim=1)
        self.key_mask = torch.cat([self.key_mask, key_mask], dim=1)
        return self.keys, self.values, self.key_mask

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        # Forget the keys: the next update starts the sequence again, as in a new cache.
        self.keys = self.values = self.key_mask = None
        self.is_initialized = False
        self.cumulative_length = 0

    def named_tensors(self) -> dict[str, torch.Tensor]:
        if not self.is_initialized:
            return {}
        return {"key": self.keys, "value": self.values, "key_mask": self.key_mask}

    def apply_to_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.is_initialized:
            self.keys, self.values, self.key_mask = fn(self.keys), fn(self.values), fn(self.key_mask)


class BasedBufferLayer(BasedAttentionLayer):
    """Keys, values and key mask in buffers of `buffer_length` positions, allocated at the first update (the slots not
    yet written are masked out) and afterwards written in place: the same shapes and addresses for the rest of the
    generation."""

    is_compileable = True

    def __init__(self, buffer_length: int):
        super().__init__()
        self.buffer_length = buffer_length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, key_mask: torch.Tensor) -> None:
        batch, _, heads, dim = key_states.shape
        self.hold(
            key_states.new_zeros(batch, self.buffer_length, heads, dim),
            value_states.new_zeros(batch, self.buffer_length, heads, value_states.shape[-1]),
            key_mask.new_zeros(batch, self.buffer_length),
        )

    def hold(self, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor) -> None:
        """Make these the buffers, kept at their addresses from now on."""
        self.keys, self.values, self.key_mask = keys, values, key_mask
        self.is_initialized = True
        mark_static(self.keys, self.values, self.key_mask)

    def reset(self) -> None:
        # Zeros under a zero mask: the buffers of a new cache, at the same addresses.
        if self.is_initialized:
            for tensor in (self.keys, self.values, self.key_mask):
                tensor.zero_()
        self.cumulative_length = 0

    def apply_to_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().apply_to_tensors(fn)
        if self.is_initialized:
            mark_static(self.keys, self.values, self.key_mask)


class BasedStaticAttentionLayer(BasedBufferLayer):
    """`full_attention` in a static cache: a buffer of `max_cache_len` positions (transformers' StaticLayer,
    time-major and masked). A one-token step writes at the position held in a tensor and attends over the whole
    buffer, whose unwritten slots are masked out, so that a compiled step sees the same shapes and no Python counter
    at every position; a longer call attends over the written part (its queries are the last of those keys, as the
    kernels expect)."""

    def __init__(self, buffer_length: int):
        super().__init__(buffer_length)
        self.position: torch.Tensor | None = None  # [1] long: the next slot to write

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, key_mask: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states, key_mask)
        self.position = torch.zeros(1, dtype=torch.long, device=key_states.device)
        mark_static(self.position)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states, key_mask)
        if key_states.shape[1] == 1:
            for buffer, new in ((self.keys, key_states), (self.values, value_states), (self.key_mask, key_mask)):
                buffer.index_copy_(1, self.position, new)
            self.position.add_(1)
            return self.keys, self.values, self.key_mask
        start, end = self.cumulative_length, self.cumulative_length + key_states.shape[1]
        self.keys[:, start:end].copy_(key_states)
        self.values[:, start:end].copy_(value_states)
        self.key_mask[:, start:end].copy_(key_mask)
        self.position.fill_(end)
        return self.keys[:, :end], self.values[:, :end], self.key_mask[:, :end]

    def reset(self) -> None:
        super().reset()
        if self.position is not None:
            self.position.zero_()

    def get_max_length(self) -> int:
        return self.buffer_length


class BasedSlidingWindowLayer(BasedBufferLayer):
    """`sliding_window_attention`: the window-1 most recent keys/values and their key mask, a fixed-size buffer.

    Own class rather than transformers' sliding-window layers: those keep head-major keys that grow until the window
    fills and no padding mask, where our kernels take time-major keys, a key mask and always window-1 cached keys.
    """

    def __init__(self, sliding_window: int):
        super().__init__(sliding_window - 1)
        self.sliding_window = sliding_window

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the window-1 cached keys followed by the new ones (values, key mask alike); keep the last window-1.
        A first update that fills the buffer (a prefill) returns the new ones alone: the empty buffer adds only
        masked keys."""
        if not self.is_initialized:
            if key_states.shape[1] >= self.buffer_length:
                start = key_states.shape[1] - self.buffer_length
                self.hold(
                    *(
                        x[:, start:].clone(memory_format=torch.contiguous_format)
                        for x in (key_states, value_states, key_mask)
                    )
                )
                return key_states, value_states, key_mask
            self.lazy_initialization(key_states, value_states, key_mask)
        return self.append(key_states, value_states, key_mask)

    def append(
        self, key_states: torch.Tensor, value_states: torch.Tensor, key_mask: torch.Tensor, before: tuple = ((), (), ())
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached window then the new keys (values, key mask alike), preceded by `before`'s (keys, values, key
        mask) tensors in the same concatenation (one launch each, not two); the buffers keep the last window-1."""
        joined = [
            torch.cat([*extra, cached, new], dim=1)
            for extra, cached, new in zip(
                before, (self.keys, self.values, self.key_mask), (key_states, value_states, key_mask)
            )
        ]
        start = joined[0].shape[1] - self.buffer_length
        for buffer, source in zip((self.keys, self.values, self.key_mask), joined):
            buffer.copy_(source[:, start:])
        return tuple(joined)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.buffer_length + query_length, 0

    def get_max_length(self) -> int:
        return self.sliding_window


def attention_sinks(key_mask: torch.Tensor, count: int, seen: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: the real keys among the first `count` real tokens of each row, when `seen` [B] real tokens came
    before these (None: none; only the count matters, capped at `count`)."""
    rank = key_mask.cumsum(1)  # int64 for a bool mask too
    if seen is not None:
        rank = rank + seen[:, None]
    return key_mask & (rank <= count)


def all_real(key_mask: torch.Tensor) -> bool:
    """Whether a key mask marks every key real, read on the host as transformers' SDPA masks are; False while
    compiling or capturing a CUDA graph, where the read is not allowed."""
    if torch.compiler.is_compiling() or (key_mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    return bool(key_mask.all())


class KeptKeys(NamedTuple):
    """The keys older than the window that a hybrid update's queries attend to: masks [B, Tk] over its keys or, by
    position, [B, S] lists of key positions (-1: none), as `hybrid_attention` takes either.

    sinks: what every query of the update sees: the sinks and the retrieval slots as they were before it.
    count: a bound on any row's count in `sinks` (the kernels size their tiles by it, not reading it on the host).
    chosen: with a new choice of retrieval keys (a multi-token update), what the update's last queries (the model's
    last window of them, the choosing ones among them) see instead: the sinks and the new slots, as every later
    query will. The earlier queries never see the keys chosen for the later ones, so their outputs do not depend on
    what follows them.
    by_position: whether `sinks` and `chosen` are lists of positions (a first prefill: the slots' own).
    """

    sinks: torch.Tensor
    count: int
    chosen: torch.Tensor | None = None
    by_position: bool = False


class BasedHybridLayer(BasedRecurrentLayer, BasedSlidingWindowLayer):
    """`hybrid_attention`: the sliding-window buffer + kv/z of the keys that have left the window (like transformers'
    LinearAttentionAndSlidingWindowAttentionLayer, on our own window layer), and buffers of older keys/values that stay
    in the softmax part, whose key mask marks the slots filled so far: the first `sinks` real tokens (attention sinks),
    then `retrieval` keys chosen by each multi-token update's `key_scores` (re-chosen among the kept and the leaving
    keys at every such update; a one-token step keeps them)."""

    def __init__(self, sliding_window: int, sinks: int = 0, retrieval: int = 0):
        BasedSlidingWindowLayer.__init__(self, sliding_window)
        BasedRecurrentLayer.__init__(self, ("kv", "z"))
        self.sinks, self.retrieval = sinks, retrieval
        self.sink_keys = self.sink_values = self.sink_mask = None
        self._sinks_full: bool | torch.Tensor = False

    @property
    def sinks_full(self) -> bool:
        """Whether every row holds all its sinks (then no later key is one). A multi-token update leaves it on the
        device, since reading it would sync (and keep a prefill out of a CUDA graph); the first read (a one-token
        step, or `BasedCache.read_flags` before a compiled or captured one) brings it to the host."""
        if isinstance(self._sinks_full, torch.Tensor):
            self._sinks_full = bool(self._sinks_full)
        return self._sinks_full

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The window layers' contract (keys, values, key mask), for a mixer that does not tell sinks apart (e.g. a
        softmax layer swapped in while choosing the layers to keep)."""
        return self.update_with_sinks(key_states, value_states, key_mask)[:3]

    def update_with_sinks(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        key_mask: torch.Tensor,
        key_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KeptKeys | None]:
        """The window's update (keys, values, key mask), preceded by the kept keys (sinks, retrieved) that have left
        the window; -> (keys, values, key mask, the kept keys or None). `key_scores(keys, key_mask)` -> [B, Tk]
        ranks the keys for the retrieval slots (None: the slots keep what they hold)."""
        if (self.sinks or self.retrieval) and key_states.shape[1] == 1 and self.sinks_full:
            # A decode step after the sinks have filled: nothing new to keep; the slots join the window's concatenation.
            slots = (self.sink_keys,), (self.sink_values,), (self.sink_mask,)
            keys, values, key_mask = self.append(key_states, value_states, key_mask, before=slots)
            kept = torch.zeros_like(key_mask)
            kept[:, : self.sink_mask.shape[1]] = self.sink_mask
            return keys, values, key_mask, KeptKeys(kept, self.sinks + self.retrieval)
        keys, values, key_mask = BasedSlidingWindowLayer.update(self, key_states, value_states, key_mask)
        if not self.sinks and not self.retrieval:
            return keys, values, key_mask, None
        if self.sink_keys is None and keys.shape[1] - self.buffer_length >= self.sinks:
            kept = self._fill_slots(keys, values, key_mask, key_scores)
        else:
            keys, values, key_mask, kept = self._update_slots(keys, values, key_mask, key_scores)
        if key_states.shape[1] > 1:
            self._sinks_full = self.sink_mask[:, : self.sinks].all()
        return keys, values, key_mask, kept

    def _update_slots(self, keys, values, key_mask, key_scores):
        """The window's keys preceded by the slots' (allocated empty at the first update); the sinks among the keys
        that leave the window join the slots, and the retrieval slots are re-chosen. -> (keys, values, key mask,
        the kept keys)."""
        if self.sink_keys is None:
            batch, _, heads, dim = keys.shape
            slots = self.sinks + self.retrieval
            self._hold_slots(
                keys.new_zeros(batch, slots, heads, dim),
                values.new_zeros(batch, slots, heads, values.shape[-1]),
                key_mask.new_zeros(batch, slots),
            )
        # The cached keys are all older than the window; ranks of the other sinks continue from their count.
        cached_sinks, retrieved = self.sink_mask[:, : self.sinks], self.sink_mask[:, self.sinks :]
        new_sinks = attention_sinks(key_mask, self.sinks, cached_sinks.sum(1))
        sink_mask = torch.cat([cached_sinks, torch.zeros_like(retrieved), new_sinks], 1)
        kept = torch.cat([self.sink_mask, new_sinks], 1)
        keys, values = torch.cat([self.sink_keys, keys], 1), torch.cat([self.sink_values, values], 1)
        key_mask = torch.cat([self.sink_mask, key_mask], 1)
        # Keep the sinks among the keys that leave the window (all but the last window - 1), in order.
        leaving = keys.shape[1] - self.buffer_length
        kept_sinks = gather_sinks(sink_mask[:, :leaving], keys[:, :leaving], values[:, :leaving], self.sinks)[1:]
        for buffer, source in zip((self.sink_keys, self.sink_values, self.sink_mask), kept_sinks):
            buffer[:, : self.sinks].copy_(source)
        # Until the choice, the update's queries see the sinks and the slots as they were before it.
        kept = KeptKeys(kept, self.sinks + self.retrieval)
        if self.retrieval and key_scores is not None:
            index, taken = self._choose(key_scores, keys, key_mask, sink_mask, leaving)
            slots = (self.sink_keys, self.sink_values, self.sink_mask)
            for buffer, source in zip(slots, (gather_keys(keys, index), gather_keys(values, index), taken)):
                buffer[:, self.sinks :].copy_(source)
            kept = kept._replace(chosen=sink_mask.bool() | index_mask(torch.where(taken, index, -1), keys.shape[1]))
        return keys, values, key_mask, kept

    def _fill_slots(self, keys, values, key_mask, key_scores) -> KeptKeys:
        """A first update whose keys leaving the window could hold every sink (a prefill): the slots are made from
        those keys alone, each buffer in one gather. -> the kept keys, by position: the slots' (a sink that stays in
        the window is in every query's window already)."""
        leaving = keys.shape[1] - self.buffer_length
        sink_mask = attention_sinks(key_mask, self.sinks)
        index, taken = first_positions(sink_mask[:, :leaving], self.sinks)
        choosing = self.retrieval and key_scores is not None
        if self.retrieval:
            if choosing:
                best, best_taken = self._choose(key_scores, keys, key_mask, sink_mask, leaving)
            else:  # the slots stay empty
                best, best_taken = (x.new_zeros(x.shape[0], self.retrieval) for x in (index, taken))
            index, taken = torch.cat([index, best], 1), torch.cat([taken, best_taken], 1)
        self._hold_slots(gather_keys(keys, index), gather_keys(values, index), taken)
        slots = torch.where(taken, index, -1)  # the sinks, then the retrieval keys
        chosen = slots if choosing else None
        return KeptKeys(slots[:, : self.sinks], self.sinks, chosen, by_position=True)

    def _hold_slots(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        self.sink_keys, self.sink_values, self.sink_mask = keys, values, mask
        mark_static(self.sink_keys, self.sink_values, self.sink_mask)

    def _choose(self, key_scores, keys, key_mask, sink_mask, leaving):
        """The retrieval slots' choice: the best-scored keys that are real, not sinks and leave the window. ->
        (positions [B, R], whether each slot took a key [B, R])."""
        eligible = key_mask.bool() & ~sink_mask.bool()
        eligible[:, leaving:] = False
        length = keys.shape[1]
        scores = key_scores(keys, key_mask).masked_fill(~eligible, -torch.inf)
        if length < self.retrieval:
            scores = torch.nn.functional.pad(scores, (0, self.retrieval - length), value=-torch.inf)
        best, index = scores.topk(self.retrieval, dim=1, sorted=False)  # [B, R]; in any order: a set of slots
        taken = best > -torch.inf
        return index.clamp(max=length - 1), taken  # slots that took nothing read any position

    def _sink_tensors(self) -> dict[str, torch.Tensor]:
        if self.sink_keys is None:
            return {}
        return {"sink_key": self.sink_keys, "sink_value": self.sink_values, "sink_mask": self.sink_mask}

    def lazy_initialization(self, *args, **kwargs) -> None:
        # The window's update passes keys positionally, update_recurrent_state passes keyword states.
        if args:
            BasedSlidingWindowLayer.lazy_initialization(self, *args, **kwargs)
        else:
            BasedRecurrentLayer.lazy_initialization(self, **kwargs)

    def reset(self) -> None:
        BasedRecurrentLayer.reset(self)
        BasedSlidingWindowLayer.reset(self)
        for tensor in self._sink_tensors().values():
            tensor.zero_()
        self._sinks_full = False

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {
            **BasedSlidingWindowLayer.named_tensors(self),
            **BasedRecurrentLayer.named_tensors(self),
            **self._sink_tensors(),
        }

    def apply_to_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        BasedSlidingWindowLayer.apply_to_tensors(self, fn)
        BasedRecurrentLayer.apply_to_tensors(self, fn)
        if self.sink_keys is not None:
            self.sink_keys, self.sink_values, self.sink_mask = map(
                fn, (self.sink_keys, self.sink_values, self.sink_mask)
            )
            mark_static(self.sink_keys, self.sink_values, self.sink_mask)


def mark_static(*tensors: torch.Tensor) -> None:
    """Tell torch.compile that these buffers keep their addresses (updated in place), as transformers' static layers
    do: CUDA graphs then read them where they are instead of skipping the graph for mutated inputs. Not while
    tracing, where it is not allowed (the buffers are allocated by the eager prefill)."""
    if not torch.compiler.is_compiling():
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)


def cache_layer(config: BasedConfig, layer_idx: int, max_cache_len: int | None = None) -> BasedLayerMixin:
    mixer_type = config.mixer_types[layer_idx]
    if mixer_type == "linear_attention":
        return BasedRecurrentLayer(("kv", "z"))
    if mixer_type == "sliding_window_attention":
        return BasedSlidingWindowLayer(config.sliding_window)
    if mixer_type == "full_attention":
        return BasedAttentionLayer() if max_cache_len is None else BasedStaticAttentionLayer(max_cache_len)
    if mixer_type == "hybrid_attention":
        return BasedHybridLayer(config.sliding_window, config.hybrid_attention_sinks, config.hybrid_retrieval_keys)
    return BasedRecurrentLayer(("conv",))


class BasedCache(Cache):
    """One cache layer per model layer (see the module docstring), and the count of positions consumed so far.

    With `max_cache_len`, a static cache: `full_attention` layers allocate that many positions up front, so that
    every layer keeps its tensors' shapes and addresses (what `generate(cache_implementation="static")` builds, and
    transformers' compiled decoding needs)."""

    def __init__(self, config: BasedConfig, max_cache_len: int | None = None):
        layers = [cache_layer(config, i, max_cache_len) for i in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self._max_cache_len = max_cache_len
        self.seen_tokens = 0  # padding included
        # Set during a compiled decoding step, which counts its tokens outside the compiled forward: Python counters
        # read or written inside it would make torch.compile specialise on them (a recompile, then dynamic ints).
        self.counted_outside_forward = False

    def check_capacity(self, length: int) -> None:
        """ValueError if `length` more tokens would overflow a static cache's full-attention buffers."""
        if self.max_cache_len is not None and self.seen_tokens + length > self.max_cache_len:
            raise ValueError(
                f"the static cache holds {self.max_cache_len} positions and this call would take it to "
                f"{self.seen_tokens + length}; create it with a larger max_cache_len (generate(): max_new_tokens and "
                "the prompt decide it)"
            )

    def advance(self, length: int) -> None:
        """Count `length` more positions, in the cache and in every layer that keeps keys."""
        self.seen_tokens += length
        for layer in self.layers:
            if isinstance(layer, BasedAttentionLayer):
                layer.cumulative_length += length

    def read_flags(self) -> None:
        """Bring to the host what multi-token updates left on the device (whether each hybrid layer's sinks are full),
        one sync, before a step that must not read them: a compiled or captured one."""
        for layer in self.layers:
            if isinstance(layer, BasedHybridLayer):
                layer.sinks_full  # noqa: B018 - the property reads it

    def __repr__(self) -> str:
        return f"BasedCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens}, bytes={self.nbytes()})"

    @property
    def max_cache_len(self) -> int | None:
        """Positions of a static cache's full-attention buffers; None for a dynamic cache. (A property of our own:
        transformers 5.17's Cache has a read-only `max_cache_len`, later versions none.)"""
        return self._max_cache_len

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("BasedCache holds recurrent states, which cannot be rolled back")

    def nbytes(self) -> int:
        """Bytes held by all layer states."""
        return sum(layer.nbytes() for layer in self.layers)

    @property
    def is_static(self) -> bool:
        """Whether, once filled, every state keeps its shape and address (updated in place): then a decode step can
        be captured in a CUDA graph and replayed. False when a `full_attention` layer's KV cache grows."""
        return all(layer.is_compileable for layer in self.layers)

    @property
    def is_compileable(self) -> bool:
        """A static cache whose layers all keep their tensors: then generate() compiles the decoding step where
        transformers compiles it for a StaticCache (the model's `create_masks_for_generate` keeps the 2D mask)."""
        return self.max_cache_len is not None and self.is_static

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def is_linear(self) -> list[bool]:
        # False everywhere so that generate() asks get_seq_length() (our token counter) like for attention caches.
        return [False] * len(self.layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)
