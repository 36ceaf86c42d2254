"""Gated DeltaNet's short convolution in PyTorch: the reference of fla's `causal_conv1d`, and incremental
decoding's form."""

import torch
import torch.nn.functional as F
from torch import Tensor


def short_conv_torch(x: Tensor, weight: Tensor, resets: Tensor | None = None) -> Tensor:
    """Causal depthwise convolution, then SiLU: x [B, T, C], weight [C, W] -> [B, T, C]. weight[:, -1]
    multiplies the current token, weight[:, -1 - s] the token s back; tokens before the start or of an
    earlier document count as zero."""
    t = x.shape[1]
    position = torch.arange(t, device=x.device)
    start = torch.where(resets, position, 0).cummax(dim=1).values if resets is not None else 0
    seen = position - start  # earlier tokens of the same document
    out = x * weight[:, -1]
    for s in range(1, weight.shape[1]):
        back = F.pad(x, (0, 0, s, 0))[:, :t]  # x[t - s]
        out = out + back * (seen >= s)[..., None] * weight[:, -1 - s]
    return F.silu(out).to(x.dtype)
