"""Incremental decoding: what each layer keeps between forward passes over a growing sequence.

A `DecodeState` travels in `SequenceContext.decode`. A forward pass with it feeds only the newest tokens
[B, n] (positions continue from the state's length); each stateful module keeps its own cache in the state,
keyed by the module: attention its keys and values (`KVCache`), Gated DeltaNet its recurrent state and
convolution inputs (`RecurrentCache`), SOSM's semantic state its MU history. `rollback(length)` forgets the
newest positions (speculative decoding's rejected drafts).

Static decoding (`DecodeState(position=...)`, for `mha` and `gqa` without a structural bias): the keys and
values live in `StaticKVCache` buffers sized for the whole generation, and the pass's position is a device
tensor that the caller sets, so no shape and no host value depends on the length: a one-token pass can be
captured once as a CUDA graph and replayed for every token (soma_lightning/generation/cuda_graph.py).
"""

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.nn.ops.attention.reference import masked_attention_reference


class KVCache:
    """Keys and values [B, H, T, hd] of the positions so far, in a buffer that grows by doubling (one copy
    per doubling instead of one per token)."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity, self.length = capacity, 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new positions' k, v [B, H, n, hd]; -> all keys and values so far."""
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            size = max(end, self.capacity, 2 * (0 if self.k is None else self.k.shape[2]))
            grown = [x.new_empty(*x.shape[:2], size, x.shape[3]) for x in (k, v)]
            if self.k is not None:
                grown[0][:, :, : self.length], grown[1][:, :, : self.length] = self.k[:, :, : self.length], self.v[:, :, : self.length]
            self.k, self.v = grown
        self.k[:, :, self.length : end], self.v[:, :, self.length : end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def rollback(self, length: int) -> None:
        self.length = min(self.length, length)


class StaticKVCache:
    """Keys and values [B, H, capacity, hd] allocated once, zero until written (a masked key must not be
    NaN garbage). The new positions are written at `position`, position + 1, ... (a device tensor); attention
    reads the whole buffer, the positions not yet written masked like any later position."""

    def __init__(self, capacity: int, position: Tensor) -> None:
        self.capacity, self.position = capacity, position
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new positions' k, v [B, H, n, hd]; -> the whole buffers."""
        if self.k is None:
            self.k, self.v = (x.new_zeros(*x.shape[:2], self.capacity, x.shape[3]) for x in (k, v))
        index = self.position + torch.arange(k.shape[2], device=k.device)
        self.k.index_copy_(2, index, k)
        self.v.index_copy_(2, index, v)
        return self.k, self.v


class RecurrentCache:
    """A recurrent layer's state after the last position, its last convolution inputs, and enough of the
    last forward pass (the state after each of its tokens, when computed step by step) to roll back into it."""

    def __init__(self, conv_size: int) -> None:
        self.conv_size = conv_size
        self.inputs: Tensor | None = None  # convolution inputs [B, <= conv_size - 1 + n, C] ending at the last position
        self.before: Tensor | None = None  # state before the last forward pass (None: zero)
        self.after: Tensor | None = None  # states [B, n or 1, ...] after each (or only the last) new token
        self.new = 0  # tokens of the last forward pass

    @property
    def state(self) -> Tensor | None:
        return None if self.after is None else self.after[:, -1]

    def conv_history(self) -> Tensor | None:
        """The last conv_size - 1 convolution inputs (fewer at the start)."""
        return None if self.inputs is None else self.inputs[:, max(0, self.inputs.shape[1] - self.conv_size + 1) :]

    def update(self, inputs: Tensor, states: Tensor, new: int) -> None:
        """`inputs`: this pass's convolution inputs with the history in front; `states` [B, new or 1, ...]."""
        self.before, self.after, self.inputs, self.new = self.state, states, inputs, new

    def rollback(self, keep: int) -> None:
        """Keep the first `keep` tokens of the last forward pass."""
        if keep == self.new:
            return
        if keep == 0:
            self.after = None if self.before is None else self.before[:, None]
        elif self.after.shape[1] == self.new:
            self.after = self.after[:, :keep]
        else:
            raise RuntimeError("rollback into a forward pass whose per-token states were not kept (DecodeState(keep_steps=True))")
        self.inputs = self.inputs[:, : self.inputs.shape[1] - (self.new - keep)]
        self.new = keep


class DecodeState:
    """The sequence so far and every layer's cache. `capacity`: expected final length (buffer size);
    `keep_steps`: keep per-token recurrent states so that `rollback` can reach into the last pass;
    `record_attention`: attention layers store the last pass's attention weights [B, H, n, T] in `attention`.
    `position` (a 0-dim long tensor on the model's device): static decoding, see the module docstring; the
    caller sets it to the first new position before each pass, caches are `StaticKVCache`s of `capacity`
    (the hard limit then), and no token history is kept (`tokens` stays None)."""

    def __init__(self, capacity: int = 0, keep_steps: bool = False, record_attention: bool = False, position: Tensor | None = None) -> None:
        self.capacity, self.keep_steps, self.record_attention = capacity, keep_steps, record_attention
        self.position = position
        self.tokens: Tensor | None = None  # [B, T]
        self.structure: Tensor | None = None  # [B, T, L] when the model reads structure
        self.caches: dict[nn.Module, Any] = {}
        self.attention: dict[nn.Module, Tensor] = {}
        self.graph = None  # SOSM: the semantic graph rows of the last pass's positions
        self.start = 0  # length before the last pass

    @property
    def length(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    @property
    def static(self) -> bool:
        return self.position is not None

    def cache(self, module: nn.Module, make: Callable[[], Any]) -> Any:
        if module not in self.caches:
            self.caches[module] = make()
        return self.caches[module]

    def kv_cache(self, module: nn.Module) -> KVCache | StaticKVCache:
        """`module`'s key/value cache: static or growing, as the state decodes."""
        return self.cache(module, lambda: StaticKVCache(self.capacity, self.position) if self.static else KVCache(self.capacity))

    def append(self, tokens: Tensor, structure: Tensor | None) -> Tensor:
        """Add the new tokens (and their structure rows); -> their positions [B, n]."""
        if self.static:
            return (self.position + torch.arange(tokens.shape[1], device=tokens.device)).expand_as(tokens)
        self.start = self.length
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens], dim=1)
        if structure is not None:
            self.structure = structure if self.structure is None else torch.cat([self.structure, structure], dim=1)
        return torch.arange(self.start, self.length, device=tokens.device).expand_as(tokens)

    def rollback(self, length: int) -> None:
        """Forget the positions from `length` on (which must lie in the last pass)."""
        if not self.start <= length <= self.length:
            raise ValueError(f"length: can only roll back within the last pass ({self.start}..{self.length}), got {length}")
        for cache in self.caches.values():
            cache.rollback(length - self.start if isinstance(cache, RecurrentCache) else length)
        self.tokens = self.tokens[:, :length]
        if self.structure is not None:
            self.structure = self.structure[:, :length]


def causal_offset_mask(start: int, n: int, device: torch.device) -> Tensor | None:
    """[n, start + n] bool: new query i (position start + i) sees keys j <= start + i; None when every key is
    visible (one new token)."""
    if n == 1:
        return None
    return torch.arange(start + n, device=device)[None] <= torch.arange(start, start + n, device=device)[:, None]


def causal_mask(state: DecodeState, positions: Tensor, keys: int) -> Tensor | None:
    """[n, keys] bool for the new queries at `positions` [B, n] (equal across rows): key j is visible from the
    query at position p when j <= p. None (all visible) for one new token over a growing cache, whose keys
    end at it; a static cache's buffer runs past it."""
    if positions.shape[1] == 1 and not state.static:
        return None
    return torch.arange(keys, device=positions.device) <= positions[0, :, None]


def cached_attention(state: DecodeState, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None = None) -> Tensor:
    """The newest queries q [B, H, n, hd] against all keys and values so far [B, Hkv, T, hd] (Hkv dividing H),
    mask broadcastable to [B, H, n, T] (None: all visible), optional additive bias. With
    `state.record_attention`, a float32 softmax whose weights are kept in state.attention[module];
    otherwise SDPA."""
    groups = q.shape[1] // k.shape[1]
    if state.record_attention:
        weights = []
        y = masked_attention_reference(q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), mask, bias, weights=weights)
        state.attention[module] = weights[0]
        return y
    if bias is not None:
        mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)
