"""Multi-head causal self-attention with RoPE (SOMA V1's `attention` module)."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import cached_attention, causal_mask
from soma_lightning.nn.differential import Differential, cached_differential
from soma_lightning.nn.ops.attention.differential import rope_halves
from soma_lightning.nn.ops.attention.reference import causal_attention_reference
from soma_lightning.nn.protocols import ComponentArgumentError, linear_flops
from soma_lightning.nn.rope import apply_rope


class MultiHeadAttention(nn.Module):
    """Four biased Linear(D, D) (query, key, value, output); heads are contiguous feature slices.
    `differential`: differential attention (nn/differential.py), two softmax maps per head, the second
    weighted by a learned lambda starting near `lambda_init`."""

    default_name = "attention"

    def __init__(
        self, d_model: int, num_heads: int = 8, rope_base: float = 10000.0, rope_scale: float = 1.0, bias: bool = True, dropout: float = 0.0,
        impl: Literal["sdpa", "reference"] = "sdpa", differential: bool = False, lambda_init: float = 0.8,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or d_model % num_heads:
            raise ComponentArgumentError("num_heads", f"d_model {d_model} is not divisible by num_heads {num_heads}")
        if (d_model // num_heads) % 2:
            raise ComponentArgumentError("num_heads", f"head dim d_model/num_heads = {d_model // num_heads} must be even for RoPE")
        if rope_scale < 1.0:
            raise ComponentArgumentError("rope_scale", f"must be >= 1.0, got {rope_scale}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.rope_base = rope_base
        self.rope_scale = rope_scale
        self.dropout = dropout
        self.impl = impl
        self.query = nn.Linear(d_model, d_model, bias=bias)
        self.key = nn.Linear(d_model, d_model, bias=bias)
        self.value = nn.Linear(d_model, d_model, bias=bias)
        self.output = nn.Linear(d_model, d_model, bias=bias)
        self.differential = Differential(self.head_dim, lambda_init) if differential else None
        self.rope_dim = self.head_dim // 2 if differential else self.head_dim

    def forward(self, x: Tensor, ctx: SequenceContext) -> Tensor:
        b, t, d = x.shape
        cos, sin = ctx.rope(self.rope_dim, self.rope_base, self.rope_scale)
        rope = apply_rope if self.differential is None else rope_halves
        q = rope(self.query(x).view(b, t, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = rope(self.key(x).view(b, t, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.value(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if ctx.decode is not None:
            k, v = ctx.decode.kv_cache(self).extend(k, v)
            mask = causal_mask(ctx.decode, ctx.positions, k.shape[2])
            if self.differential is None:
                y = cached_attention(ctx.decode, self, q, k, v, mask)
            else:
                y = cached_differential(ctx.decode, self, self.differential, q, k, v, mask)
        elif self.differential is not None and self.impl == "sdpa":
            y = self.differential(lambda qh, kh: F.scaled_dot_product_attention(qh, kh, v, is_causal=True, dropout_p=dropout_p), q, k)
        elif self.differential is not None:
            y = self.differential.reference(q, k, v, torch.ones(t, t, dtype=torch.bool, device=x.device).tril(), dropout_p=dropout_p)
        elif self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            y = causal_attention_reference(q, k, v, dropout_p)
        return self.output(y.transpose(1, 2).reshape(b, t, -1))

    def prepare_context(self, ctx: SequenceContext) -> None:
        ctx.rope(self.rope_dim, self.rope_base, self.rope_scale)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs: the four projections, plus QK^T and AV over the (seq_len+1)/2 keys a causal query sees."""
        d = self.query.in_features
        maps = 1 if self.differential is None else 2  # QK^T costs the same over two half-width maps; AV twice
        return linear_flops(self) + (2 + 2 * maps) * d * (seq_len + 1) / 2

    def supports_static_decode(self) -> bool:
        return True

    def tensor_parallel_plan(self, tp: int) -> dict[str, ParallelStyle]:
        """Heads split over the ranks: q, k, v column-wise, the output projection row-wise."""
        if self.num_heads % tp:
            raise ComponentArgumentError("num_heads", f"{self.num_heads} heads do not split over tp={tp} tensor-parallel ranks")
        return {"query": ColwiseParallel(), "key": ColwiseParallel(), "value": ColwiseParallel(), "output": RowwiseParallel()}
