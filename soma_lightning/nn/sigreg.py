"""SIGReg as the SOMA V1 contract defines it (section 4.1): a per-token characteristic-function test over slices.

For each token, project onto the K unit-normalised noise columns (y = x @ A), average cos/sin(t * y) over
the slices, compare with the Gaussian characteristic function exp(-t^2/2) on t = linspace(0, t_max, points)
with weights [dt, 2dt, ..., 2dt, dt] * exp(-t^2/2), multiply by K; the statistic is the mean over tokens.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SIGRegConfig:
    coefficient: float = 0.02
    slices: int = 256
    points: int = 17
    t_max: float = 3.0


def _grid(t_max: float, points: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(t, phi(t), trapezoid weights * phi(t))."""
    t = torch.linspace(0, t_max, points, device=device)
    phi = torch.exp(-0.5 * t**2)
    weights = torch.full((points,), 2 * t_max / (points - 1), device=device)
    weights[0] = weights[-1] = t_max / (points - 1)
    return t, phi, weights * phi


def _project(x: Tensor, noise: Tensor) -> Tensor:
    x, noise = x.float(), noise.float()
    return x @ (noise / noise.norm(dim=0))


def sigreg_statistic_reference(x: Tensor, noise: Tensor, t_max: float = 3.0, points: int = 17) -> Tensor:
    """Raw SIGReg (no coefficient) of x [..., D] against noise [D, K], written as the contract states it;
    materialises [..., K, points]."""
    t, phi, weights = _grid(t_max, points, x.device)
    yt = _project(x, noise).unsqueeze(-1) * t
    err = (yt.cos().mean(dim=-2) - phi) ** 2 + yt.sin().mean(dim=-2) ** 2
    return ((err * weights).sum(dim=-1) * noise.shape[1]).mean()


def _rotations(y: Tensor, dt: float, points: int):
    """cos(t_j y), sin(t_j y) for t_j = j * dt, j = 0..points-1, by angle addition from cos/sin(dt * y)."""
    c1, s1 = torch.cos(dt * y), torch.sin(dt * y)
    c, s = torch.ones_like(y), torch.zeros_like(y)
    for j in range(points):
        if j:
            c, s = c * c1 - s * s1, s * c1 + c * s1
        yield c, s


def _rotation_means(y: Tensor, dt: float, points: int) -> tuple[Tensor, Tensor]:
    """Per token, the means over the slices of cos(t_j y) and sin(t_j y): two [..., points] tensors."""
    means = [(c.mean(dim=-1), s.mean(dim=-1)) for c, s in _rotations(y, dt, points)]
    return torch.stack([m[0] for m in means], dim=-1), torch.stack([m[1] for m in means], dim=-1)


def _rotation_grad(y: Tensor, a: Tensor, b: Tensor, dt: float, points: int) -> Tensor:
    """sum_j a_j sin(t_j y) + b_j cos(t_j y), with a, b [..., points] per token."""
    out = torch.zeros_like(y)
    for j, (c, s) in enumerate(_rotations(y, dt, points)):
        out += a[..., j : j + 1] * s + b[..., j : j + 1] * c
    return out


@functools.cache
def _compiled(loop: Callable) -> Callable:
    """One of the two loops as one fused kernel (about 70 elementwise kernels eager, at V1's training shape);
    made on first use, so that importing this module does not import torch's compiler."""
    return torch.compile(loop, dynamic=True)


class _SIGReg(torch.autograd.Function):
    """Per-token statistic without the [N, K, points] intermediates: forward keeps the per-token means, and
    backward regenerates the rotations instead of storing them (memory O(N * K))."""

    @staticmethod
    def forward(ctx, y: Tensor, t_max: float, points: int, compiled: bool) -> Tensor:
        t, phi, weights = _grid(t_max, points, y.device)
        dt = t_max / (points - 1)
        cos_mean, sin_mean = (_compiled(_rotation_means) if compiled else _rotation_means)(y, dt, points)
        err = (cos_mean - phi) ** 2 + sin_mean**2
        ctx.save_for_backward(y, cos_mean, sin_mean)
        ctx.t_max, ctx.points, ctx.compiled = t_max, points, compiled
        return (err * weights).sum(dim=-1) * y.shape[-1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, cos_mean, sin_mean = ctx.saved_tensors
        t, phi, weights = _grid(ctx.t_max, ctx.points, y.device)
        dt = ctx.t_max / (ctx.points - 1)
        # d stat / d y_k = sum_j 2 w_j t_j (-(cos_mean_j - phi_j) sin(t_j y_k) + sin_mean_j cos(t_j y_k))
        a = 2 * weights * t * -(cos_mean - phi)
        b = 2 * weights * t * sin_mean
        out = (_compiled(_rotation_grad) if ctx.compiled else _rotation_grad)(y, a, b, dt, ctx.points)
        return out * grad.unsqueeze(-1), None, None, None


def sigreg_statistic(x: Tensor, noise: Tensor, t_max: float = 3.0, points: int = 17, compiled: bool = False) -> Tensor:
    """Raw SIGReg (no coefficient) of representations x [..., D] against noise [D, K], in float32; equal to
    `sigreg_statistic_reference` (cos/sin of t_j y by angle addition, rounding error ~points * 1e-7).
    `compiled`: the rotation loops through torch.compile (training with `--model.compile true`); the
    evaluation and scoring paths keep the eager loops, whose rounding the V1 parity tests pin."""
    return _SIGReg.apply(_project(x, noise), t_max, points, compiled).mean()
