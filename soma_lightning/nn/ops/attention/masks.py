"""Which keys a query may see, as small FlexAttention mask functions (b, h, q_idx, kv_idx) -> bool, combined
with `and_masks` / `or_masks` (as in torchtitan). The same functions run on broadcastable index tensors:
`dense_mask` evaluates them over every (query, key) pair for SDPA and the reference, flex.py's block mask
over FlexAttention's blocks.

GroupedQueryAttention's pattern, for key k of query q (both positions in one packed window):

    causal  and  (sliding_window  or  global_tokens)  and  same_document

that is, k <= q and (q - k < window or k % global_stride == 0) and doc[q] == doc[k]. Without a window every
earlier key is visible, and global keys mean nothing; without document ids the window is one document.
"""

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import _mask_mod_signature, and_masks, or_masks


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return kv_idx <= q_idx


def sliding_window(window: int) -> _mask_mod_signature:
    """The `window` most recent keys, the query's own included (with `causal`)."""

    def in_window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < window

    return in_window


def beyond_window(window: int) -> _mask_mod_signature:
    """Keys at least `window` positions back: where global keys add to what the window shows."""

    def far(b, h, q_idx, kv_idx):
        return q_idx - kv_idx >= window

    return far


def global_tokens(stride: int) -> _mask_mod_signature:
    """Keys at positions 0, stride, 2 * stride, ..., visible from any later query."""

    def is_global(b, h, q_idx, kv_idx):
        return kv_idx % stride == 0

    return is_global


def same_document(doc_ids: Tensor) -> _mask_mod_signature:
    """doc_ids [B, T]: query and key in one document of row b. Keys clamp to the last position because
    flex.py's key layout has padding slots that map past it (masked anyway)."""
    last = doc_ids.shape[1] - 1

    def same(b, h, q_idx, kv_idx):
        return doc_ids[b, q_idx] == doc_ids[b, kv_idx.clamp(max=last)]

    return same


def positions_pattern(window: int | None, global_stride: int | None) -> _mask_mod_signature:
    """The pattern without documents."""
    if window is None:
        return causal
    local = sliding_window(window)
    return and_masks(causal, or_masks(local, global_tokens(global_stride)) if global_stride is not None else local)


def attention_pattern(window: int | None, global_stride: int | None, doc_ids: Tensor | None) -> _mask_mod_signature:
    """The whole pattern (module docstring)."""
    pattern = positions_pattern(window, global_stride)
    return and_masks(pattern, same_document(doc_ids)) if doc_ids is not None else pattern


def visible(q: Tensor, k: Tensor, window: int | None, global_stride: int | None) -> Tensor:
    """The pattern without documents on broadcastable position tensors q, k (incremental decoding's queries
    against the cached keys)."""
    return positions_pattern(window, global_stride)(q.new_zeros(()), None, q, k)


def dense_mask(t: int, window: int | None, global_stride: int | None, doc_ids: Tensor | None, device: torch.device) -> Tensor:
    """[B or 1, 1, T, T] boolean mask, True where attention is allowed."""
    idx = torch.arange(t, device=device)
    rows = torch.arange(len(doc_ids) if doc_ids is not None else 1, device=device)
    mask = attention_pattern(window, global_stride, doc_ids)(rows[:, None, None, None], None, idx[:, None], idx[None, :])
    return mask.expand(len(rows), 1, t, t)
