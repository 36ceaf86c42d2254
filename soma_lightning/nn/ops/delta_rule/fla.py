"""flash-linear-attention's kernels on [B, T, ...] tensors with document resets (CUDA only; fla imported
lazily, so that this package imports without it)."""

from typing import Callable

import torch
from torch import Tensor


def sequence_bounds(resets: Tensor) -> Tensor:
    """[B, T] resets -> fla's `cu_seqlens` for the batch flattened to one row: every row start and every
    reset, then B*T. Reading the bounds back synchronises with the host, so a caller that runs several fla
    ops over the same documents computes them once and passes them on (fla also caches what it derives
    from them by tensor identity)."""
    b, t = resets.shape
    starts = resets.clone()
    starts[:, 0] = True
    bounds = starts.flatten().nonzero().flatten()
    return torch.cat([bounds, bounds.new_tensor([b * t])])


def fla_call(
    fn: Callable[..., tuple[Tensor, Tensor | None]], tensors: list[Tensor], resets: Tensor | None, cu_seqlens: Tensor | None, **kwargs
) -> Tensor:
    """Run an fla op on [B, T, ...] tensors. With resets, every document becomes one of fla's variable-length
    sequences (`sequence_bounds`, unless given as cu_seqlens)."""
    if resets is None:
        return fn(*tensors, **kwargs)[0]
    b, t = resets.shape
    cu_seqlens = sequence_bounds(resets) if cu_seqlens is None else cu_seqlens
    out = fn(*(x.flatten(0, 1).unsqueeze(0) for x in tensors), cu_seqlens=cu_seqlens, **kwargs)[0]
    return out.view(b, t, *out.shape[2:])


def fla_gated_delta_rule(q, k, v, g, beta, resets, scale, cu_seqlens) -> Tensor:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return fla_call(chunk_gated_delta_rule, [q, k, v, g, beta], resets, cu_seqlens, scale=scale, use_qk_l2norm_in_kernel=True)


def fla_short_conv(x: Tensor, weight: Tensor, resets: Tensor | None, cu_seqlens: Tensor | None) -> Tensor:
    from fla.modules.causal_conv1d import causal_conv1d

    return fla_call(causal_conv1d, [x], resets, cu_seqlens, weight=weight, activation="silu")
