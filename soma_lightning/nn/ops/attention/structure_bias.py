"""The structural attention bias: a learned bias per head and bucketed tree distance between query and key
(Graphormer's spatial encoding over the nested spans of data_modules/structure.py).

`structure` [B, T, L] lists each position's enclosing span starts, outermost first, -1 past its depth. The
tree distance of two positions is the number of steps from one's innermost span to the other's through their
deepest common span (0 within one span); distances from buckets - 1 on share the last bucket.

Two forms: `structure_bias`, the dense [B, H, T, S] bias (SDPA, the reference, decoding), and
`flex_with_structure_bias`, FlexAttention reading one precomputed bucket per score (`structure_buckets`) with
the table's gradient from structure_grad.py's Triton kernel.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from soma_lightning.nn.ops.attention.flex import flex, global_slots, with_global_keys


def tree_distance(structure: Tensor, keys: Tensor | None = None) -> Tensor:
    """[B, T, L] structure of the queries, and of the keys [B, S, L] (default: the same positions) -> [B, T, S]
    tree distances."""
    keys = structure if keys is None else keys
    valid = structure >= 0
    same = (structure[:, :, None, :] == keys[:, None, :, :]) & valid[:, :, None, :]
    common = same.long().cumprod(dim=-1).sum(dim=-1)
    return valid.sum(-1)[:, :, None] + (keys >= 0).sum(-1)[:, None, :] - 2 * common


def structure_bias(table: Tensor, structure: Tensor, keys: Tensor | None = None) -> Tensor:
    """[H, buckets] learned bias, [B, T, L] structure (of the queries; of the keys [B, S, L], default the
    same) -> [B, H, T, S], the tree distance clipped to the last bucket."""
    bucket = tree_distance(structure, keys).clamp(max=table.shape[1] - 1)
    return table[:, bucket].permute(1, 0, 2, 3)


def structure_buckets(structure: Tensor, n_buckets: int, window: int | None, global_stride: int | None) -> Tensor:
    """[B, T, L] structure -> [B, T, G + W] uint8: `structure_bias`'s bucket of the tree distance from each
    query q to the keys it can see, in the key layout of flex.py's `block_mask`. Column i < G is the global key
    i * global_stride (G = `global_slots`, 0 without global keys); column G + j is the key q - j of the window
    (W = window, T without one). Columns of keys that are not there (k < 0, k > q) hold 0.

    For a visible key k <= q, the spans q and k share are exactly q's spans that start at or before k (spans
    are intervals), so the distance needs q's span starts and k's depth only. For the window's key q - j
    they are q's spans less those with q - start < j: a running count over j."""
    b, t, levels = structure.shape
    w = window if window is not None else t
    g = global_slots(t, global_stride)
    device = structure.device
    valid = structure >= 0
    depth = valid.sum(-1, dtype=torch.int32)
    pos = torch.arange(t, device=device)
    out = torch.empty(b, t, g + w, dtype=torch.uint8, device=device)

    key_pos = torch.arange(g, device=device) * (global_stride or 1)
    shared = ((structure[:, :, None, :] <= key_pos[None, None, :, None]) & valid[:, :, None, :]).sum(-1)
    distance = depth[:, :, None] + depth[:, None, key_pos.clamp(max=t - 1)] - 2 * shared
    out[..., :g] = torch.where(key_pos <= pos[:, None], distance.clamp(0, n_buckets - 1), 0)

    first_j_outside = torch.where(valid, pos[None, :, None] - structure + 1, w).clamp(max=w)  # [B, T, L]
    key_depth = F.pad(depth, (w - 1, 0)).unfold(1, w, 1).flip(-1)  # [B, T, W]: the depth of key q - j
    exists = torch.arange(w, device=device) <= pos[:, None]
    chunk = max(1, 2**26 // (b * w))  # queries per step, bounding the [B, chunk, W] int32 counts
    for q0 in range(0, t, chunk):
        q1 = min(q0 + chunk, t)
        lost = torch.zeros(b, q1 - q0, w + 1, dtype=torch.int32, device=device)
        lost.scatter_add_(2, first_j_outside[:, q0:q1], torch.ones_like(first_j_outside[:, q0:q1], dtype=torch.int32))
        distance = key_depth[:, q0:q1] - depth[:, q0:q1, None] + 2 * lost[..., :w].cumsum(-1, dtype=torch.int32)
        out[:, q0:q1, g:] = torch.where(exists[q0:q1], distance.clamp(0, n_buckets - 1), 0)
    return out


def structure_score_mod(table: Tensor, buckets: Tensor, global_stride: int | None):
    """The structural bias as a FlexAttention score_mod over the key layout of `block_mask`, reading one
    precomputed bucket (`structure_buckets`) per score. The table enters as a constant: FlexAttention would
    differentiate it by one atomic add per score into a table of a few entries; `flex_with_structure_bias`
    supplies its gradient instead."""
    t, cols = buckets.shape[1], buckets.shape[2]
    g = global_slots(t, global_stride)
    table = table.detach()

    def score_mod(score, b, h, q_idx, kv_idx):
        # kv_idx >= g is the key at position kv_idx - g, in column g + q_idx - (kv_idx - g)
        column = torch.where(kv_idx < g, kv_idx, 2 * g + q_idx - kv_idx) if g else q_idx - kv_idx
        return score + table[h, buckets[b, q_idx, column.clamp(0, cols - 1)].int()]

    return score_mod


class _StructureTableGrad(torch.autograd.Function):
    """Identity on the attention output; its backward adds the bias table's gradient, computed from the
    output, its gradient and the logsumexp by `structure_grad.structure_table_grad`."""

    @staticmethod
    def forward(ctx, out, table, q, k, v, lse, buckets, doc_ids, window, global_stride):
        ctx.save_for_backward(q, k, v, out, lse, table, buckets, doc_ids)
        ctx.window, ctx.global_stride = window, global_stride
        return out.view_as(out)

    @staticmethod
    def backward(ctx, d_out):
        from soma_lightning.nn.ops.attention.structure_grad import structure_table_grad  # Triton is optional (the gpu extra)

        q, k, v, out, lse, table, buckets, doc_ids = ctx.saved_tensors
        d_table = structure_table_grad(q, k, v, out, d_out, lse, table, buckets, doc_ids, ctx.window, ctx.global_stride)
        return d_out, d_table, None, None, None, None, None, None, None, None


def flex_with_structure_bias(
    q: Tensor, k: Tensor, v: Tensor, mask, table: Tensor, buckets: Tensor, doc_ids: Tensor | None, window: int | None, global_stride: int | None
) -> Tensor:
    """FlexAttention under `block_mask`'s pattern plus the structural bias `table` [H, buckets] read through
    `structure_buckets`; k, v [B, Hkv, T, D] in position order."""
    score_mod = structure_score_mod(table, buckets, global_stride)
    k_in, v_in = (with_global_keys(k, global_stride), with_global_keys(v, global_stride)) if global_stride is not None else (k, v)
    if not (torch.is_grad_enabled() and table.requires_grad):
        return flex(q, k_in, v_in, mask, score_mod)
    out, lse = flex(q, k_in, v_in, mask, score_mod, return_lse=True)
    return _StructureTableGrad.apply(out, table, q, k, v, lse.detach(), buckets, doc_ids, window, global_stride)
