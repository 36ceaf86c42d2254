"""Plain softmax attention in float32: the one reference every attention path is tested against, and the
arithmetic of SOMA V1's original implementation."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None = None, dropout_p: float = 0.0, weights: list | None = None
) -> Tensor:
    """softmax(q k^T / sqrt(hd) + bias) v over q [B, H, T, hd], k, v [B, H, S, hd] (as many heads as q), in
    float32 also under autocast, returned in q's dtype. `mask` (broadcastable to [B, H, T, S], None: all
    visible) fills the hidden scores with finfo(float32).min rather than -inf, so that a query with no visible
    key averages instead of turning into NaN. `dropout_p` drops softmax weights as SDPA does. `weights`: a list
    to append the softmax weights [B, H, T, S] to (before dropout)."""
    with torch.autocast(q.device.type, enabled=False):
        scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
        if bias is not None:
            scores = scores + bias.float()
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = scores.softmax(dim=-1)
        if weights is not None:
            weights.append(probs)
        if dropout_p:
            probs = F.dropout(probs, dropout_p)
        return (probs @ v.float()).to(q.dtype)


def causal_attention_reference(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """The reference's causal attention (query i sees keys j <= i)."""
    t = q.shape[-2]
    return masked_attention_reference(q, k, v, torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), dropout_p=dropout_p)
