"""Split-half ("rotate-half", NeoX-style) rotary position embedding, as the SOMA V1 contract defines it."""

import torch
from torch import Tensor


def rope_angles(positions: Tensor, head_dim: int, base: float = 10000.0, scale_factor: float = 1.0) -> Tensor:
    """Angles [B, T, head_dim/2] in float32: (position / base**(2i/head_dim)) / scale_factor."""
    fraction = 2 * torch.arange(head_dim // 2, dtype=torch.float32, device=positions.device) / head_dim
    timescale = base**fraction
    return positions.to(torch.float32).unsqueeze(-1) / timescale / scale_factor


def rope_tables(positions: Tensor, head_dim: int, base: float = 10000.0, scale_factor: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles, [B, T, 1, head_dim/2] float32 (broadcast over heads)."""
    angles = rope_angles(positions, head_dim, base, scale_factor).unsqueeze(-2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, H, head_dim] by the angles whose `rope_tables` are cos, sin; computed in float32,
    returned in x's dtype."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)


def interleaved_rope_tables(positions: Tensor, second: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """`rope_tables` with the even-indexed frequencies at `positions` and the odd-indexed at `second` [B, T]:
    two kinds of position, each rotating half of the pairs, across the whole frequency range."""
    even = torch.arange(head_dim // 2, device=positions.device) % 2 == 0
    angles = torch.where(even, rope_angles(positions, head_dim, base), rope_angles(second, head_dim, base)).unsqueeze(-2)
    return angles.cos(), angles.sin()
