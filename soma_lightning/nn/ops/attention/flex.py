"""FlexAttention for the masks.py pattern: the block mask, the global keys gathered in front of the keys, and
the kernel tiles for Hopper.

A global key k % global_stride == 0 lies in its own block of keys, so a query far down a long window would
visit one block per global key. `with_global_keys` instead copies the global keys into a block-padded prefix
of the keys, and the block mask reads that prefix for the keys beyond the window: one or two blocks of global
keys per query.
"""

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, and_masks, create_block_mask, flex_attention

from soma_lightning.nn.ops.attention.masks import attention_pattern, beyond_window, same_document

FLEX_BLOCK = 128  # FlexAttention's default block size

# FlexAttention's CUDA kernels need head dims of at least this (their Triton tiles' dot products); the CPU path
# takes any.
FLEX_CUDA_MIN_HEAD_DIM = 16

# Backward tiles for bf16 at head dim 64 on Hopper, where they beat inductor's defaults (`python bench/moe.py
# --parts attention_op` compares the two).
HOPPER_HEAD_DIM_64_TILES = {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64, "bwd_num_warps": 4, "bwd_num_stages": 3}

# Forward tiles with a score_mod, same conditions: inductor's default (128 x 128, 3 stages) needs more shared
# memory than an H100 has once structure_bias.py's score_mod gathers a bucket per score.
HOPPER_SCORE_MOD_FORWARD_TILES = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}

_compiled_flex = None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def global_slots(t: int, global_stride: int | None) -> int:
    """Room for the global keys 0, s, 2s, ... in front of the keys, padded to a whole block (0 without them)."""
    return _ceil_div(_ceil_div(t, global_stride), FLEX_BLOCK) * FLEX_BLOCK if global_stride is not None else 0


def with_global_keys(k: Tensor, global_stride: int) -> Tensor:
    """[..., T, hd] -> [..., G + T, hd]: the global keys (positions 0, s, 2s, ...) in a block-padded prefix of
    G = `global_slots` rows, then all keys."""
    g = global_slots(k.shape[-2], global_stride)
    prefix = k[..., ::global_stride, :]
    pad = k.new_zeros(*k.shape[:-2], g - prefix.shape[-2], k.shape[-1])
    return torch.cat([prefix, pad, k], dim=-2)


def block_mask(t: int, window: int | None, global_stride: int | None, doc_ids: Tensor | None, device: torch.device):
    """The pattern as a FlexAttention BlockMask over the keys `with_global_keys` lays out when there is a
    global stride, over the plain keys otherwise."""
    batch = len(doc_ids) if doc_ids is not None else None
    local = attention_pattern(window, None, doc_ids)
    if global_stride is None:
        return create_block_mask(local, batch, None, t, t, device=device)
    far = and_masks(beyond_window(window), same_document(doc_ids)) if doc_ids is not None else beyond_window(window)
    g, n_global = global_slots(t, global_stride), _ceil_div(t, global_stride)

    def mask_mod(b, h, q_idx, kv_idx):
        # Slot kv_idx < g holds the global key at kv_idx * global_stride (padding from n_global on), seen only
        # where the window does not already show it; slot kv_idx >= g holds the key at kv_idx - g.
        is_global = kv_idx < g
        k_pos = torch.where(is_global, kv_idx * global_stride, kv_idx - g)
        return torch.where(is_global, (kv_idx < n_global) & far(b, h, q_idx, k_pos), local(b, h, q_idx, k_pos))

    return create_block_mask(mask_mod, batch, None, t, g + t, device=device)


def default_kernel_options(q: Tensor, score_mod) -> dict | None:
    """The Hopper tiles above where they apply, else None (inductor's defaults)."""
    tuned = q.is_cuda and q.dtype == torch.bfloat16 and q.shape[-1] == 64
    if not (tuned and torch.cuda.get_device_capability(q.device) == (9, 0)):
        return None
    return HOPPER_HEAD_DIM_64_TILES if score_mod is None else {**HOPPER_HEAD_DIM_64_TILES, **HOPPER_SCORE_MOD_FORWARD_TILES}


def flex(q: Tensor, k: Tensor, v: Tensor, mask, score_mod=None, kernel_options: dict | None = None, return_lse: bool = False):
    """FlexAttention, compiled on CUDA (inside a compiled model, by that compile: creating one while dynamo
    traces breaks the graph). `kernel_options` None takes `default_kernel_options`. With `return_lse`,
    (output, natural-log logsumexp [B, H, T])."""
    global _compiled_flex
    if q.is_cuda and min(q.shape[-1], v.shape[-1]) < FLEX_CUDA_MIN_HEAD_DIM:
        raise ValueError(
            f"impl: FlexAttention on CUDA needs head dims of at least {FLEX_CUDA_MIN_HEAD_DIM}, got {q.shape[-1]} for "
            f"queries and keys and {v.shape[-1]} for values; use impl 'auto' or 'sdpa' (gqa), 'gather' (graph_attention)"
        )
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
