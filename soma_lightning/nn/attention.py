"""Multi-head causal self-attention with RoPE (SOMA V1's `attention` module)."""

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import cached_attention, causal_mask
from soma_lightning.nn.ops.attention.reference import causal_attention_reference
from soma_lightning.nn.protocols import ComponentArgumentError
from soma_lightning.nn.rope import apply_rope


class MultiHeadAttention(nn.Module):
    """Four biased Linear(D, D) (query, key, value, output); heads are contiguous feature slices."""

    default_name = "attention"

    def __init__(
        self, d_model: int, num_heads: int = 8, rope_base: float = 10000.0, rope_scale: float = 1.0, bias: bool = True, dropout: float = 0.0,
        impl: Literal["sdpa", "reference"] = "sdpa",
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

    def forward(self, x: Tensor, ctx: SequenceContext) -> Tensor:
        b, t, d = x.shape
        cos, sin = ctx.rope(self.head_dim, self.rope_base, self.rope_scale)
        q = apply_rope(self.query(x).view(b, t, self.num_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.key(x).view(b, t, self.num_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.value(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        if ctx.decode is not None:
            k, v = ctx.decode.kv_cache(self).extend(k, v)
            y = cached_attention(ctx.decode, self, q, k, v, causal_mask(ctx.decode, ctx.positions, k.shape[2]))
        elif self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            y = causal_attention_reference(q, k, v, self.dropout if self.training else 0.0)
        return self.output(y.transpose(1, 2).reshape(b, t, d))

    def prepare_context(self, ctx: SequenceContext) -> None:
        ctx.rope(self.head_dim, self.rope_base, self.rope_scale)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs: the four projections, plus QK^T and AV over the (seq_len+1)/2 keys a causal query sees."""
        d = self.query.in_features
        return 4 * 2 * d * d + 2 * 2 * d * (seq_len + 1) / 2

    def supports_static_decode(self) -> bool:
        return True
