"""GroupedQueryAttention's ways to attend, one class each, picked by its `impl` argument (BACKENDS).

Each computes the masks.py pattern for q [B, H, T, D] against k, v [B, Hkv, T, D] (Hkv dividing H), plus the
structural bias when `table` [H, buckets] is given (ctx.structure then holds the spans), with attention
dropout `dropout_p` (0 outside training) where `supports_dropout`. They keep what several layers of one
forward pass can share in ctx.flex_block_masks and ctx.structure_buckets, built by `prepare` before the blocks
run (or on first use when nothing prepared them).
"""

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.ops.attention.flex import FLEX_CUDA_MIN_HEAD_DIM, block_mask, flex, with_global_keys
from soma_lightning.nn.ops.attention.masks import dense_mask
from soma_lightning.nn.ops.attention.reference import masked_attention_reference
from soma_lightning.nn.ops.attention.structure_bias import flex_with_structure_bias, structure_bias, structure_buckets


# scaled_dot_product_attention's kernels in the order training tries them (`soma-lightning fit` sets it for the
# whole run): cuDNN first, which at SOMA V1's head dim 256 takes 1.14 ms per forward+backward against flash's
# 1.72 (bench/attention.py, docs/benchmarks.md); a kernel that cannot take the inputs is passed over for the next.
SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class AttentionBackend:
    """Called as backend(q, k, v, ctx, table, dropout_p) -> [B, H, T, D] (module docstring); `head_dim` is the
    smallest last dim of the q, k and v it is called with (half the head dim under differential attention)."""

    supports_dropout = True

    def __init__(self, window: int | None, global_stride: int | None, head_dim: int) -> None:
        self.window, self.global_stride, self.head_dim = window, global_stride, head_dim

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: SequenceContext, table: Tensor | None, dropout_p: float) -> Tensor:
        raise NotImplementedError

    def prepare(self, ctx: SequenceContext, table: Tensor | None, dropout_p: float) -> None:
        """Build the values of ctx that a call with these arguments reads and other layers share."""

    def plain_causal(self, ctx: SequenceContext, table: Tensor | None) -> bool:
        """Whether the pattern is causal attention over the whole window, without bias."""
        return self.window is None and ctx.doc_ids is None and table is None

    def dense_mask(self, q: Tensor, ctx: SequenceContext) -> Tensor:
        return dense_mask(q.shape[2], self.window, self.global_stride, ctx.doc_ids, q.device)


class ReferenceBackend(AttentionBackend):
    """Plain float32 softmax over the dense mask, the key/value heads repeated for their query heads: what
    the other backends are tested against."""

    def __call__(self, q, k, v, ctx, table, dropout_p):
        groups = q.shape[1] // k.shape[1]
        bias = structure_bias(table, ctx.structure) if table is not None else None
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return masked_attention_reference(q, k, v, self.dense_mask(q, ctx), bias, dropout_p)


class SDPABackend(AttentionBackend):
    """PyTorch's scaled_dot_product_attention: its causal kernels for plain causal attention, else the dense
    mask, with the structural bias as an additive mask."""

    def __call__(self, q, k, v, ctx, table, dropout_p):
        gqa = q.shape[1] != k.shape[1]
        if self.plain_causal(ctx, table):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)
        mask = self.dense_mask(q, ctx)
        if table is not None:
            mask = structure_bias(table, ctx.structure).to(q.dtype).masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


class FlexBackend(AttentionBackend):
    """FlexAttention over flex.py's block mask, the structural bias as a score_mod: memory and work follow the
    visible keys rather than T^2. FlexAttention has no attention dropout, and no backward on the CPU."""

    supports_dropout = False

    def __call__(self, q, k, v, ctx, table, dropout_p):
        if dropout_p:
            raise ValueError(f"dropout: FlexAttention has no attention dropout, got {dropout_p}")
        self.prepare(ctx, table, dropout_p)
        mask = ctx.flex_block_masks[(self.window, self.global_stride)]
        if table is not None:
            buckets = ctx.structure_buckets[(table.shape[1], self.window, self.global_stride)]
            return flex_with_structure_bias(q, k, v, mask, table, buckets, ctx.doc_ids, self.window, self.global_stride)
        if self.global_stride is not None:
            k, v = with_global_keys(k, self.global_stride), with_global_keys(v, self.global_stride)
        return flex(q, k, v, mask)

    def prepare(self, ctx, table, dropout_p):
        key = (self.window, self.global_stride)
        if key not in ctx.flex_block_masks:
            ctx.flex_block_masks[key] = block_mask(ctx.positions.shape[1], *key, ctx.doc_ids, ctx.positions.device)
        if table is not None and (table.shape[1], *key) not in ctx.structure_buckets:
            ctx.structure_buckets[(table.shape[1], *key)] = structure_buckets(ctx.structure, table.shape[1], *key)


class AutoBackend(AttentionBackend):
    """Flex on CUDA where a window, documents or the structural bias make a mask, SDPA otherwise: Flex has no
    backward on the CPU, and SDPA's causal kernels need no mask. Training with attention dropout also takes
    SDPA, over the dense mask, since Flex cannot drop, and so do heads too small for Flex's CUDA kernels."""

    def __init__(self, window: int | None, global_stride: int | None, head_dim: int) -> None:
        super().__init__(window, global_stride, head_dim)
        self.sdpa, self.flex = SDPABackend(window, global_stride, head_dim), FlexBackend(window, global_stride, head_dim)

    def pick(self, q: Tensor, ctx: SequenceContext, table: Tensor | None, dropout_p: float) -> AttentionBackend:
        """The backend for queries `q` (any tensor on their device)."""
        flex_runs = q.is_cuda and self.head_dim >= FLEX_CUDA_MIN_HEAD_DIM
        return self.flex if flex_runs and not self.plain_causal(ctx, table) and not dropout_p else self.sdpa

    def __call__(self, q, k, v, ctx, table, dropout_p):
        return self.pick(q, ctx, table, dropout_p)(q, k, v, ctx, table, dropout_p)

    def prepare(self, ctx, table, dropout_p):
        self.pick(ctx.positions, ctx, table, dropout_p).prepare(ctx, table, dropout_p)


BACKENDS: dict[str, type[AttentionBackend]] = {"auto": AutoBackend, "sdpa": SDPABackend, "flex": FlexBackend, "reference": ReferenceBackend}
