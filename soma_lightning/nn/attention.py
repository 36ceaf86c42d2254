"""Multi-head causal self-attention with RoPE (SOMA V1's `attention` module)."""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import cached_attention, causal_mask
from soma_lightning.nn.rope import apply_rope


def masked_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
    """Plain softmax attention over [B, H, T, hd] (k/v with as many heads as q), in float32 also under
    autocast: scores / sqrt(hd) (+ bias), positions outside `mask` filled with finfo(float32).min."""
    with torch.autocast(q.device.type, enabled=False):
        scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
        if bias is not None:
            scores = scores + bias.float()
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def causal_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The reference's causal attention (query i sees keys j <= i)."""
    t = q.shape[-2]
    return masked_attention_reference(q, k, v, torch.ones(t, t, dtype=torch.bool, device=q.device).tril())


class MultiHeadAttention(nn.Module):
    """Four biased Linear(D, D) (query, key, value, output); heads are contiguous feature slices."""

    default_name = "attention"

    def __init__(
        self,
        d_model: int,
        num_heads: int = 8,
        rope_base: float = 10000.0,
        rope_scale: float = 1.0,
        bias: bool = True,
        dropout: float = 0.0,
        impl: Literal["sdpa", "reference"] = "sdpa",
    ) -> None:
        super().__init__()
        if num_heads <= 0 or d_model % num_heads:
            raise ValueError(f"num_heads: d_model {d_model} is not divisible by num_heads {num_heads}")
        if (d_model // num_heads) % 2:
            raise ValueError(f"num_heads: head dim d_model/num_heads = {d_model // num_heads} must be even for RoPE")
        if rope_scale < 1.0:
            raise ValueError(f"rope_scale: must be >= 1.0, got {rope_scale}")
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
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            if self.training and self.dropout > 0:
                raise ValueError("impl 'reference' has no attention dropout; use impl 'sdpa' to train with dropout")
            y = causal_attention_reference(q, k, v)
        return self.output(y.transpose(1, 2).reshape(b, t, d))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs: the four projections, plus QK^T and AV over the (seq_len+1)/2 keys a causal query sees."""
        d = self.query.in_features
        return 4 * 2 * d * d + 2 * 2 * d * (seq_len + 1) / 2
