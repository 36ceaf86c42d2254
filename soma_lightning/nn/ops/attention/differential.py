"""Differential attention (Ye et al., "Differential Transformer", 2024): two softmax maps of one head, the
second subtracted, (A1 - lambda A2) V.

A head's query and key [.., hd] are read as two halves of hd/2 (map 1 the first, map 2 the second half, each
with its own rotary phases, `rope_halves`); the value keeps all hd dims. The softmax scale is 1/sqrt(hd/2).

    differential_attention            the fast form: any attention function called once per map, then
                                      A1 V - lambda A2 V (the same by linearity), so SDPA, FlexAttention or
                                      the graph's gather serve unchanged
    differential_attention_reference  the two dense float32 maps formed and subtracted, then times V
"""

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from soma_lightning.nn.rope import apply_rope


def halves(x: Tensor) -> tuple[Tensor, Tensor]:
    """[..., hd] -> the first and the second hd/2 dims: map 1's and map 2's part of a query or key."""
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


def rope_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, hd] with each half rotated on its own (`apply_rope` with tables for head dim hd/2)."""
    return apply_rope(x.reshape(*x.shape[:-2], 2 * x.shape[-2], x.shape[-1] // 2), cos, sin).view_as(x)


def differential_attention(attend: Callable[[Tensor, Tensor], Tensor], q: Tensor, k: Tensor, lam: Tensor) -> Tensor:
    """attend(q_half, k_half) -> [B, H, T, hd]: one softmax map over the halves, applied to the values (with
    whatever mask, bias and dropout the caller closes over); q [B, H, T, hd], k [B, Hkv, S, hd], lam a
    scalar -> attend(map 1) - lam * attend(map 2)."""
    (q1, q2), (k1, k2) = halves(q), halves(k)
    return attend(q1, k1) - lam.to(q.dtype) * attend(q2, k2)


def differential_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, lam: Tensor, mask: Tensor | None, bias: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """(A1 - lam A2) v in float32, returned in q's dtype: A_m = softmax(q_m k_m^T / sqrt(hd/2) + bias) over q
    [B, H, T, hd], k [B, H, S, hd] (as many heads as q), v [B, H, S, hd_v]; `mask` (broadcastable to
    [B, H, T, S], None: all visible) hides keys as masked_attention_reference does; dropout drops each map's
    weights on its own, as the fast form does."""
    (q1, q2), (k1, k2) = halves(q.float()), halves(k.float())
    maps = []
    for qm, km in ((q1, k1), (q2, k2)):
        scores = qm @ km.transpose(-2, -1) / math.sqrt(qm.shape[-1])
        if bias is not None:
            scores = scores + bias.float()
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        maps.append(F.dropout(scores.softmax(dim=-1), dropout_p) if dropout_p else scores.softmax(dim=-1))
    return ((maps[0] - lam.float() * maps[1]) @ v.float()).to(q.dtype)
