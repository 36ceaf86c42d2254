"""Grouped-query causal attention with RoPE, optional QK-norm, and the long-context local + global pattern.

Visibility of key k from query q (both positions in one packed window):
    k <= q  and  (q - k < window  or  k % global_stride == 0)  and  doc[q] == doc[k]
`window` None means unlimited; `global_stride` None means no global keys; without document ids every
position is one document. On GPU the pattern runs as a FlexAttention block mask, the strided global keys
gathered into a compact prefix of the keys; the dense boolean mask (through SDPA, or the plain softmax
reference) is its CPU reference.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.nn.attention import masked_attention_reference
from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import cached_attention, causal_mask
from soma_lightning.nn.rope import apply_rope


def visible(q: Tensor, k: Tensor, window: int | None, global_stride: int | None) -> Tensor:
    """The position part of the pattern for broadcastable index tensors q, k."""
    allowed = k <= q
    if window is not None:
        near = q - k < window
        if global_stride is not None:
            near = near | (k % global_stride == 0)
        allowed = allowed & near
    return allowed


def dense_mask(t: int, window: int | None, global_stride: int | None, doc_ids: Tensor | None, device: torch.device) -> Tensor:
    """[B or 1, 1, T, T] boolean mask, True where attention is allowed."""
    idx = torch.arange(t, device=device)
    mask = visible(idx[:, None], idx[None, :], window, global_stride)[None, None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return mask


def tree_distance(structure: Tensor, keys: Tensor | None = None) -> Tensor:
    """[B, T, L] enclosing-span starts (outermost first, -1 past the depth) of the queries, and of the keys
    [B, S, L] (default: the same positions) -> [B, T, S]: steps from one position's innermost span to the
    other's through their deepest common span (0 within one span)."""
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


_compiled_flex = None
FLEX_BLOCK = 128  # FlexAttention's default block size


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _global_slots(t: int, global_stride: int) -> int:
    """Room for the global keys 0, s, 2s, ... in front of the keys, padded to a whole block."""
    return _ceil_div(_ceil_div(t, global_stride), FLEX_BLOCK) * FLEX_BLOCK


def with_global_keys(k: Tensor, global_stride: int) -> Tensor:
    """[..., T, hd] -> [..., G + T, hd]: the global keys (positions 0, s, 2s, ...) gathered into a
    block-padded prefix, then all keys. The block mask reads the prefix for keys outside the window, so a
    query visits one or two blocks of global keys instead of one block per global key."""
    g = _global_slots(k.shape[-2], global_stride)
    prefix = k[..., ::global_stride, :]
    pad = k.new_zeros(*k.shape[:-2], g - prefix.shape[-2], k.shape[-1])
    return torch.cat([prefix, pad, k], dim=-2)


def block_mask(t: int, window: int | None, global_stride: int | None, doc_ids: Tensor | None, device: torch.device):
    """The pattern as a FlexAttention BlockMask over the keys `with_global_keys` lays out when there is a
    global stride, over the plain keys otherwise."""
    from torch.nn.attention.flex_attention import create_block_mask

    g = _global_slots(t, global_stride) if global_stride is not None else 0
    n_global = _ceil_div(t, global_stride) if global_stride is not None else 0

    def mask_mod(b, h, q_idx, kv_idx):
        if g:
            is_global = kv_idx < g
            k_pos = torch.where(is_global, kv_idx * global_stride, kv_idx - g)
            allowed = torch.where(is_global, (kv_idx < n_global) & (q_idx - k_pos >= window), visible(q_idx, k_pos, window, None))
        else:
            k_pos = kv_idx
            allowed = visible(q_idx, k_pos, window, None)
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q_idx] == doc_ids[b, k_pos.clamp(max=t - 1)])
        return allowed

    return create_block_mask(mask_mod, len(doc_ids) if doc_ids is not None else None, None, t, g + t, device=device)


def structure_buckets(structure: Tensor, n_buckets: int, window: int | None, global_stride: int | None) -> Tensor:
    """[B, T, L] structure -> [B, T, G + W] uint8: `structure_bias`'s bucket of the tree distance from each
    query q to the keys it can see, in the key layout of `block_mask`. Column i < G is the global key
    i * global_stride (G = the padded global slots, 0 without global keys); column G + j is the key q - j of
    the window (W = window, T without one). Columns of keys that are not there (k < 0, k > q) hold 0.

    For a visible key k <= q, the spans q and k share are exactly q's spans that start at or before k (spans
    are intervals), so the distance needs q's span starts and k's depth only. For the window's key q - j
    they are q's spans less those with q - start < j: a running count over j."""
    b, t, levels = structure.shape
    w = window if window is not None else t
    g = _global_slots(t, global_stride) if global_stride is not None else 0
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
    chunk = max(1, 2**26 // (b * w))
    for q0 in range(0, t, chunk):
        q1 = min(q0 + chunk, t)
        lost = torch.zeros(b, q1 - q0, w + 1, dtype=torch.int32, device=device)
        lost.scatter_add_(2, first_j_outside[:, q0:q1], torch.ones_like(first_j_outside[:, q0:q1], dtype=torch.int32))
        distance = key_depth[:, q0:q1] - depth[:, q0:q1, None] + 2 * lost[..., :w].cumsum(-1, dtype=torch.int32)
        out[:, q0:q1, g:] = torch.where(exists[q0:q1], distance.clamp(0, n_buckets - 1), 0)
    return out


def structure_score_mod(table: Tensor, buckets: Tensor, global_stride: int | None):
    """The structural bias as a FlexAttention score_mod over the key layout of `block_mask`, reading one
    precomputed bucket (`structure_buckets`) per score. The table enters as a constant: its gradient comes
    from `flex_with_structure_bias`, not from FlexAttention's per-score atomic adds."""
    t, cols = buckets.shape[1], buckets.shape[2]
    g = _global_slots(t, global_stride) if global_stride is not None else 0
    table = table.detach()

    def score_mod(score, b, h, q_idx, kv_idx):
        # kv_idx >= g is the key at position kv_idx - g, in column g + q_idx - (kv_idx - g)
        column = torch.where(kv_idx < g, kv_idx, 2 * g + q_idx - kv_idx) if g else q_idx - kv_idx
        return score + table[h, buckets[b, q_idx, column.clamp(0, cols - 1)].int()]

    return score_mod


# Backward tiles for bf16 at head dim 64 on Hopper, the best of a grid of nine on an H100 (`python bench/moe.py
# --parts attention_op` compares them with inductor's defaults).
HOPPER_HEAD_DIM_64_TILES = {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64, "bwd_num_warps": 4, "bwd_num_stages": 3}


# Forward tiles with a score_mod, same conditions: inductor's default (128 x 128, 3 stages) needs more shared
# memory than an H100 has once structure_score_mod gathers a bucket per score; 64 x 64 was the fastest of three.
HOPPER_SCORE_MOD_FORWARD_TILES = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}


def default_kernel_options(q: Tensor, score_mod) -> dict | None:
    """The tiles above where they were measured, else None (inductor's defaults)."""
    measured = q.is_cuda and q.dtype == torch.bfloat16 and q.shape[-1] == 64
    if not (measured and torch.cuda.get_device_capability(q.device) == (9, 0)):
        return None
    return HOPPER_HEAD_DIM_64_TILES if score_mod is None else {**HOPPER_HEAD_DIM_64_TILES, **HOPPER_SCORE_MOD_FORWARD_TILES}


def flex(q: Tensor, k: Tensor, v: Tensor, mask, score_mod=None, kernel_options: dict | None = None, return_lse: bool = False):
    """FlexAttention, compiled on CUDA (inside a compiled model, by that compile: creating one while dynamo
    traces breaks the graph). `kernel_options` None takes `default_kernel_options`. With `return_lse`,
    (output, natural-log logsumexp [B, H, T])."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    global _compiled_flex
    run = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        run = _compiled_flex
    if kernel_options is None:
        kernel_options = default_kernel_options(q, score_mod)
    aux = AuxRequest(lse=True) if return_lse else None
    out = run(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1], kernel_options=kernel_options, return_aux=aux)
    return (out[0], out[1].lse) if return_lse else out


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
        from soma_lightning.nn.structure_grad import structure_table_grad

        q, k, v, out, lse, table, buckets, doc_ids = ctx.saved_tensors
        d_table = structure_table_grad(q, k, v, out, d_out, lse, table, buckets, doc_ids, ctx.window, ctx.global_stride)
        return d_out, d_table, None, None, None, None, None, None, None, None


def flex_with_structure_bias(
    q: Tensor, k: Tensor, v: Tensor, mask, table: Tensor, buckets: Tensor, doc_ids: Tensor | None, window: int | None, global_stride: int | None
) -> Tensor:
    """FlexAttention under `block_mask`'s pattern plus the structural bias `table` [H, buckets] read through
    `structure_buckets`; k, v [B, Hkv, T, D] in position order. On CUDA the table's gradient comes from one
    Triton pass that sums score gradients per bucket within each tile (structure_grad.py)."""
    score_mod = structure_score_mod(table, buckets, global_stride)
    k_in, v_in = (with_global_keys(k, global_stride), with_global_keys(v, global_stride)) if global_stride is not None else (k, v)
    if not (torch.is_grad_enabled() and table.requires_grad):
        return flex(q, k_in, v_in, mask, score_mod)
    out, lse = flex(q, k_in, v_in, mask, score_mod, return_lse=True)
    return _StructureTableGrad.apply(out, table, q, k, v, lse.detach(), buckets, doc_ids, window, global_stride)


class GroupedQueryAttention(nn.Module):
    """num_heads query heads share num_kv_heads key/value heads (num_heads % num_kv_heads == 0). impl "auto":
    FlexAttention on CUDA when a window, document ids or the structural bias call for it, SDPA otherwise
    (FlexAttention has no backward on CPU). `structure_buckets`: add a learned per-head bias indexed by the
    tree distance between query and key (from the batch's `structure`, see data_modules/structure.py),
    distances from structure_buckets - 1 on sharing the last bucket."""

    default_name = "attention"

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        bias: bool = False,
        rope_base: float = 10000.0,
        window: int | None = None,
        global_stride: int | None = None,
        structure_buckets: int | None = None,
        dropout: float = 0.0,
        impl: Literal["auto", "sdpa", "flex", "reference"] = "auto",
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if structure_buckets is not None and not 2 <= structure_buckets <= 256:
            raise ValueError(f"structure_buckets: need 2 to 256 buckets (stored as bytes) or null, got {structure_buckets}")
        if num_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        head_dim = head_dim or d_model // num_heads
        if head_dim % 2 or head_dim <= 0:
            raise ValueError(f"head_dim: must be positive and even for RoPE, got {head_dim}")
        for name, value in (("window", window), ("global_stride", global_stride)):
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be positive or null, got {value}")
        if global_stride is not None and window is None:
            raise ValueError("global_stride: global keys only make sense with a window")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_base, self.window, self.global_stride = rope_base, window, global_stride
        self.dropout, self.impl = dropout, impl
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        # Graphormer-style spatial encoding: a learned bias per head and bucketed tree distance.
        self.structure_bias = nn.Parameter(torch.zeros(num_heads, structure_buckets)) if structure_buckets else None

    def forward(self, x: Tensor, ctx: SequenceContext) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = ctx.rope(self.head_dim, self.rope_base)
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        y = self._attend(q, k, v, ctx) if ctx.decode is None else self._attend_cached(q, k, v, ctx)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: SequenceContext) -> Tensor:
        doc_ids = ctx.doc_ids
        if self.structure_bias is not None and ctx.structure is None:
            raise ValueError("structure_buckets is set, but the batch carries no `structure` (data.init_args.structure: true)")
        plain_causal = self.window is None and doc_ids is None and self.structure_bias is None
        if self.impl == "flex" or (self.impl == "auto" and q.is_cuda and not plain_causal):
            key = ("block_mask", self.window, self.global_stride)
            if key not in ctx.cache:
                ctx.cache[key] = block_mask(q.shape[2], self.window, self.global_stride, doc_ids, q.device)
            if self.structure_bias is not None:
                n = self.structure_bias.shape[1]
                bkey = ("structure_buckets", n, self.window, self.global_stride)
                if bkey not in ctx.cache:
                    ctx.cache[bkey] = structure_buckets(ctx.structure, n, self.window, self.global_stride)
                return flex_with_structure_bias(q, k, v, ctx.cache[key], self.structure_bias, ctx.cache[bkey], doc_ids, self.window, self.global_stride)
            if self.global_stride is not None:
                k, v = with_global_keys(k, self.global_stride), with_global_keys(v, self.global_stride)
            return flex(q, k, v, ctx.cache[key])
        groups = self.num_heads // self.num_kv_heads
        bias = structure_bias(self.structure_bias, ctx.structure) if self.structure_bias is not None else None
        if self.impl == "reference":
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            mask = dense_mask(q.shape[2], self.window, self.global_stride, doc_ids, q.device)
            return masked_attention_reference(q, k, v, mask, bias)
        p = self.dropout if self.training else 0.0
        if plain_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=groups > 1)
        mask = dense_mask(q.shape[2], self.window, self.global_stride, doc_ids, q.device)
        if bias is not None:
            mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=groups > 1)

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, ctx: SequenceContext) -> Tensor:
        """The new positions' queries against the cached keys (the KV heads only), under the same pattern
        and structural bias as `_attend` (one document: generation never packs several). The pattern is
        evaluated at the positions, so it also masks a static cache's not yet written tail."""
        state = ctx.decode
        k, v = state.kv_cache(self).extend(k, v)
        n, t = q.shape[2], k.shape[2]
        if self.window is None:
            mask = causal_mask(state, ctx.positions, t)
        else:
            mask = visible(ctx.positions[0, :, None], torch.arange(t, device=q.device), self.window, self.global_stride)
        bias = None
        if self.structure_bias is not None:
            if state.structure is None:
                raise ValueError("structure_buckets is set, but decoding was given no `structure` rows")
            bias = structure_bias(self.structure_bias, state.structure[:, t - n :], state.structure)
        return cached_attention(state, self, q, k, v, mask, bias)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections plus QK^T and AV over the keys a query sees on average (window and global keys
        counted for a full window without document breaks)."""
        t, w, s = seq_len, self.window, self.global_stride
        keys = (t + 1) / 2
        if w is not None:
            local = w * (w + 1) // 2 + (t - w) * w if t > w else t * (t + 1) // 2
            far = 0
            if s is not None and t > w:  # query q >= w also sees keys 0, s, 2s, ... <= q - w
                m = t - w
                full, rest = divmod(m, s)
                far = m + s * full * (full - 1) // 2 + full * rest
            keys = (local + far) / t
        projections = 2 * (self.q_proj.weight.numel() + self.k_proj.weight.numel() + self.v_proj.weight.numel() + self.o_proj.weight.numel())
        return projections + 2 * 2 * self.num_heads * self.head_dim * keys
