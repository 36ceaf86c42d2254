"""SIGReg as the SOMA V1 contract defines it (section 4.1): a per-token characteristic-function test over slices."""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SIGRegConfig:
    coefficient: float = 0.02
    slices: int = 256
    points: int = 17
    t_max: float = 3.0


def sigreg_statistic(x: Tensor, noise: Tensor, t_max: float = 3.0, points: int = 17) -> Tensor:
    """Raw SIGReg (no coefficient) of representations x [..., D] against noise [D, K], in float32.

    Per token: project onto the K unit-normalised noise columns, average cos/sin(t * y) over the slices,
    compare with the Gaussian characteristic function exp(-t^2/2) on t = linspace(0, t_max, points) with
    weights [dt, 2dt, ..., 2dt, dt] * exp(-t^2/2), multiply by K; then the mean over tokens.
    """
    x, noise = x.float(), noise.float()
    t = torch.linspace(0, t_max, points, device=x.device)
    dt = t_max / (points - 1)
    phi = torch.exp(-0.5 * t**2)
    weights = torch.full((points,), 2 * dt, device=x.device)
    weights[0] = weights[-1] = dt
    weights = weights * phi
    y = x @ (noise / noise.norm(dim=0))
    yt = y.unsqueeze(-1) * t
    err = (yt.cos().mean(dim=-2) - phi) ** 2 + yt.sin().mean(dim=-2) ** 2
    return ((err * weights).sum(dim=-1) * noise.shape[1]).mean()
