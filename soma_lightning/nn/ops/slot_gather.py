"""Rows gathered along the sequence dimension, as an op that torch.compile does not look into.

`slot_gather(x, index)` is `x.gather(2, index.expand(...))` with its backward a `scatter_add_`, each run by
PyTorch's own kernels. Inlined under inductor, the backward of that gather (graph attention's keys and values
per (query, slot)) became a scatter that made a compiled SOSM training step slower than the eager one on an H100;
opaque, the rest of the block still compiles around it (docs/benchmarks.md, torch.compile)."""

import torch
from torch import Tensor


@torch.library.custom_op("soma_lightning::slot_gather", mutates_args=())
def slot_gather(x: Tensor, index: Tensor) -> Tensor:
    """x [B, H, S, D], index [B, 1, N, 1] of positions in 0 .. S-1 -> [B, H, N, D]: row index[b, 0, n] of x[b, h]."""
    b, h, _, d = x.shape
    return x.gather(2, index.expand(b, h, index.shape[2], d)).contiguous()


@slot_gather.register_fake
def _(x: Tensor, index: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1], index.shape[2], x.shape[3])


@torch.library.custom_op("soma_lightning::slot_scatter_add", mutates_args=())
def slot_scatter_add(grad: Tensor, index: Tensor, length: int) -> Tensor:
    """The gradient of `slot_gather`'s x: grad [B, H, N, D] summed into [B, H, length, D] at index's rows."""
    b, h, n, d = grad.shape
    return grad.new_zeros(b, h, length, d).scatter_add_(2, index.expand(b, h, n, d), grad)


@slot_scatter_add.register_fake
def _(grad: Tensor, index: Tensor, length: int) -> Tensor:
    return grad.new_empty(grad.shape[0], grad.shape[1], length, grad.shape[3])


def _setup(ctx, inputs, output) -> None:
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.length = x.shape[2]


def _backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
    (index,) = ctx.saved_tensors
    return slot_scatter_add(grad, index, ctx.length), None


slot_gather.register_autograd(_backward, setup_context=_setup)
