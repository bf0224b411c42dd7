"""A KV cache layer that writes a decode step's keys and values in place.

transformers' `DynamicLayer` appends with `torch.cat`: every decode step copies the whole
cache of every layer into new tensors, a cost that grows with batch x length (the offline
LM at `fast`, fp32 cache, 30 layers: 16 rows at 300 positions copy ~220 MB a step).
`RoomyLayer` keeps its keys and values as views of buffers with room for more positions
and copies only the new ones in; only when the room runs out (every `room(t)` positions)
does it copy the cache, into a larger buffer. The values, and so every output, are the same.
A small cache (under IN_PLACE_FROM rows x positions) still appends by `torch.cat`.

`with_room(cache)` switches a `DynamicCache`'s full-attention layers to it in place (other
layer kinds, sliding windows, are left alone). A layer whose `keys` are replaced from
outside (the scheduler trimming padding) gets a fresh buffer at the next update; its own
methods that replace them (selecting rows, crop, ...) let go of the buffers at once.
"""

import torch
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 32        # positions of room at least: one copy of the cache per 32 decode steps
# rows x positions below which a layer appends as DynamicLayer does (torch.cat): a small
# cache costs little to copy, and in place measured no faster there (bench_kv_cache, offline
# LM: 8 x 70 0.97-1.01x, 16 x 70 1.02x, 8 x 200 1.00-1.02x), with more ops per update
IN_PLACE_FROM = 2048


def room(length: int) -> int:
    """Positions of room a buffer gets beyond `length`: an eighth more (at most 12.5% of
    the cache held spare), at least MIN_ROOM."""
    return max(MIN_ROOM, length // 8)


class RoomyLayer(DynamicLayer):
    """`DynamicLayer` with in-place appends (module docstring). It appends as DynamicLayer
    does (torch.cat) where in place would not pay or not be safe: a small cache, autograd
    on, new states that do not match the cache (the cat raises or promotes, as it would)."""

    _key_buffer = _value_buffer = None
    _keys_view = _values_view = None      # what `update` last returned, while still in place

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        t = self.keys.shape[-2] if self.keys.dim() == key_states.dim() else 0   # empty: (0,)
        if not self._in_place(key_states, value_states, t + n):
            # a first update, no room left, keys and values replaced from outside
            if key_states.shape[0] * (t + n) < IN_PLACE_FROM or torch.is_grad_enabled() or \
                    (t and not (_fits(key_states, self.keys) and
                                _fits(value_states, self.values))):
                self.reset_buffers()
                return super().update(key_states, value_states)
            self._rebuffer(key_states, value_states, t)
        self._key_buffer.narrow(-2, t, n).copy_(key_states)      # the usual decode step:
        self._value_buffer.narrow(-2, t, n).copy_(value_states)  # only the new positions
        self.keys = self._keys_view = self._key_buffer.narrow(-2, 0, t + n)
        self.values = self._values_view = self._value_buffer.narrow(-2, 0, t + n)
        return self.keys, self.values

    def _in_place(self, key_states: torch.Tensor, value_states: torch.Tensor,
                  total: int) -> bool:
        """Whether the keys and values are still the buffers' views this layer returned,
        the buffers have room for `total` positions, and the new states fit them (shape,
        dtype, device; inference mode as when they were made; no autograd)."""
        buffer = self._key_buffer
        return (self.keys is self._keys_view and self.values is self._values_view
                and total <= buffer.shape[-2]
                and _fits(key_states, buffer) and _fits(value_states, self._value_buffer)
                and buffer.is_inference() == torch.is_inference_mode_enabled()
                and not torch.is_grad_enabled())

    def _rebuffer(self, key_states: torch.Tensor, value_states: torch.Tensor, t: int) -> None:
        """New buffers holding the first `t` positions of the current keys and values, with
        room after them for the new states and more."""
        want = t + key_states.shape[-2]
        size = want + room(want)
        self._key_buffer = _buffer(self.keys, key_states, t, size)
        self._value_buffer = _buffer(self.values, value_states, t, size)

    def reset_buffers(self) -> None:
        """Let go of the buffers (the keys and values stay)."""
        self._key_buffer = self._value_buffer = self._keys_view = self._values_view = None

    # What replaces the keys and values lets go of the buffers at once, not at the next
    # update: a batch that lost a row would hold both caches meanwhile.
    def reset(self) -> None:
        self.reset_buffers()
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.reset_buffers()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.reset_buffers()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.reset_buffers()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.reset_buffers()

    def offload(self) -> None:
        super().offload()
        self.reset_buffers()


def _fits(states: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether `states` can be written into (or after) `like` as they are: the same rows,
    heads, head size, dtype and device (copy_ would broadcast or cast where cat fails)."""
    return (states.dtype == like.dtype and states.device == like.device
            and states.shape[:-2] == like.shape[:-2] and states.shape[-1] == like.shape[-1])


def _buffer(old: torch.Tensor, like: torch.Tensor, t: int, size: int) -> torch.Tensor:
    """A tensor shaped as `like` with `size` positions, its first `t` copied from `old`."""
    shape = list(like.shape)
    shape[-2] = size
    buffer = like.new_empty(shape)
    if t:
        buffer.narrow(-2, 0, t).copy_(old)
    return buffer


def with_room(cache):
    """`cache` (a DynamicCache) with its plain `DynamicLayer`s switched to `RoomyLayer`
    (same object, same tensors; the first update copies them into a roomy buffer). An
    offloading cache is left as it is (its layers move between devices every step). Two
    shallow copies of one layer would write into one buffer: copy a cache deeply."""
    if getattr(cache, "offloading", False):
        return cache
    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer:
            layer.__class__ = RoomyLayer
    return cache


def full_attention(layer) -> bool:
    """Whether a cache layer keeps every position (what batching and trimming assume)."""
    return type(layer) in (DynamicLayer, RoomyLayer)
