"""Split-half ("rotate-half", NeoX-style) rotary position embedding, as the SOMA V1 contract defines it."""

import torch
from torch import Tensor


def rope_angles(positions: Tensor, head_dim: int, base: float = 10000.0, scale_factor: float = 1.0) -> Tensor:
    """Angles [B, T, head_dim/2] in float32: (position / base**(2i/head_dim)) / scale_factor."""
    fraction = 2 * torch.arange(head_dim // 2, dtype=torch.float32, device=positions.device) / head_dim
    timescale = base**fraction
    return positions.to(torch.float32).unsqueeze(-1) / timescale / scale_factor


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate x [B, T, H, head_dim] by angles [B, T, head_dim/2]; computed in float32, returned in x's dtype."""
    cos = angles.cos().unsqueeze(-2)
    sin = angles.sin().unsqueeze(-2)
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)
