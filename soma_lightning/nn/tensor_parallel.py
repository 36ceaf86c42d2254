"""What components need for tensor parallelism (TP) beyond torch's ParallelStyles: styles for a module's own
parameters (sharded by head, or whole on every rank), and `local` and `local_segments`, through which a
forward reads them; and the style that splits a mixture of experts' hidden units (`ExpertHiddenParallel`).

Under TP a head-split component holds num_heads / tp heads per rank: its forward reads the head count from
the tensor shapes (`view(B, T, -1, head_dim)`), so the same code runs on one device and on a TP rank.
"""

import functools

import torch
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


class ParameterPlacements(ParallelStyle):
    """The module's own parameters (not its submodules') as DTensors over the TP ranks, each with its placement:
    Shard(dim) splits it by head (a per-head bias table [H, buckets] along dim 0); Replicate() keeps it whole on
    every rank for a forward that applies it to this rank's heads, through `local` (a norm weight over the
    head dimension) or `local_segments` (rows of each head)."""

    def __init__(self, **placements: Placement) -> None:
        super().__init__()
        self.placements = placements

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, placement in self.placements.items():
            param = getattr(module, name)
            if param is not None:
                distributed = distribute_tensor(param.data, device_mesh, [placement])
                module.register_parameter(name, nn.Parameter(distributed, requires_grad=param.requires_grad))
        return module


class SharedHeadsParallel(ParallelStyle):
    """A Linear with fewer output `heads` than TP ranks, each head then shared by tp / heads ranks (GQA's
    key/value projections with few KV heads): its weights whole on every rank, its output this rank's head,
    the one its share of the query heads reads. Backward gathers each head's gradient from the ranks sharing
    it, so the weights get their whole gradient on every rank."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, input_fn=self._input, output_fn=self._output)

    @staticmethod
    def _input(module: nn.Module, inputs: tuple, device_mesh: DeviceMesh) -> tuple:
        return (DTensor.from_local(inputs[0], device_mesh, [Replicate()], run_check=False), *inputs[1:])

    def _output(self, module: nn.Module, output: DTensor, device_mesh: DeviceMesh) -> Tensor:
        share = device_mesh.size() // self.heads
        heads = output.unflatten(-1, (self.heads, 1, -1))
        copies = heads.expand(*heads.shape[:-2], share, heads.shape[-1]).flatten(-3)  # head h once per rank sharing it
        return copies.redistribute(device_mesh, [Shard(copies.ndim - 1)]).to_local()


def local(t: Tensor | None) -> Tensor | None:
    """This rank's shard of a parameter ParameterPlacements sharded, or the whole of one it replicated, whose
    gradient is then the sum over the ranks; any other tensor, or None, as it is."""
    if not isinstance(t, DTensor):
        return t
    replicated = all(isinstance(p, Replicate) for p in t.placements)
    return t.to_local(grad_placements=[Partial()] * len(t.placements)) if replicated else t.to_local()


def local_segments(t: Tensor, sizes: list[int]) -> Tensor:
    """Of a parameter ParameterPlacements replicated whose rows are consecutive segments of `sizes` rows
    (e.g. the channels of q, k and v), this rank's equal share of each segment, concatenated; `t` itself
    on one device."""
    if not isinstance(t, DTensor):
        return t
    return torch.cat([part.redistribute(placements=[Shard(0)]).to_local() for part in t.split(sizes)])


class ExpertHiddenParallel(ParameterPlacements):
    """A mixture of experts (nn/moe.py) with every expert's hidden units split over the TP ranks, each rank
    running every expert (routed and shared) on its share: `w_in` [E, D, hidden] by column, `w_out`
    [E, hidden, D] by row; the router stays whole, seeing whole tensors. The rows going into the experts
    are the same on every rank (their gradient is summed over the ranks in backward); the experts' outputs,
    partial sums over each rank's hidden units, are made whole by one all-reduce before the gates weigh
    them. SwiGLU's `w_in` holds the gate and the up columns side by side ([E, D, 2 x hidden]); it is stored
    as a contiguous block per rank (a distributed checkpoint stores one block per rank), and each forward
    pairs each rank's gate and up columns by one all-to-all (`paired_halves`)."""

    def __init__(self) -> None:
        super().__init__(w_in=Shard(2), w_out=Shard(1), shared_in=Shard(2), shared_out=Shard(1))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        super()._apply(module, device_mesh)
        module.tp_mesh = device_mesh
        module.__class__ = _hidden_parallel_class(type(module))
        return module


class HiddenParallelExperts:
    """Mixed into an MoE's class by ExpertHiddenParallel: its experts run on this rank's hidden units."""

    tp_mesh: DeviceMesh
    swiglu: bool
    shared_in: Tensor | None
    shared_out: Tensor | None

    def _run_experts(self, x: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
        w_in, w_out = local(w_in), local(w_out)  # DTensors here, or expert parallel's local shards already
        if self.swiglu:
            w_in = paired_halves(w_in, self.tp_mesh)
        y = super()._run_experts(replicated(x, self.tp_mesh), counts, w_in, w_out)
        return summed(y, self.tp_mesh)

    def shared_experts(self, flat: Tensor, dtype: torch.dtype) -> Tensor | float:
        """The shared experts as routed experts that every token goes to."""
        if self.shared_in is None:
            return 0.0
        shared, n = self.shared_in.shape[0], flat.shape[0]
        counts = torch.full((shared,), n, device=flat.device)
        y = self._run_experts(flat.to(dtype).repeat(shared, 1), counts, self.shared_in, self.shared_out)
        return y.view(shared, n, -1).sum(dim=0).to(flat.dtype)


@functools.cache
def _hidden_parallel_class(cls: type) -> type:
    return type(f"HiddenParallel{cls.__name__}", (HiddenParallelExperts, cls), {})


def replicated(x: Tensor, mesh: DeviceMesh) -> Tensor:
    """`x`, the same on every rank of `mesh`, as it is; in backward its gradient is summed over the ranks."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def summed(x: Tensor, mesh: DeviceMesh) -> Tensor:
    """The sum of `x` over the ranks of `mesh` (one all-reduce); in backward each rank's gradient is the sum's."""
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).full_tensor()


def paired_halves(w: Tensor, mesh: DeviceMesh) -> Tensor:
    """Of a weight whose last dimension holds two halves side by side (SwiGLU's gate and up columns), this
    rank's block of that dimension split evenly over the ranks of `mesh` -> its share of each half side by
    side, [first half's | second half's], for the same units as `w_out`'s Shard(1) rows. The dimension is
    2 tp pieces, rank r holding pieces 2r and 2r + 1 and needing pieces r and tp + r: one all-to-all
    (backward sends the gradients back)."""
    tp, rank = mesh.size(), mesh.get_local_rank()
    pieces = w.movedim(-1, 0).chunk(2)
    destinations = [(2 * rank + i) % tp for i in range(2)]
    order = sorted(range(2), key=lambda i: destinations[i])
    width = pieces[0].shape[0]
    send_sizes = [width if r in destinations else 0 for r in range(tp)]
    # piece r comes from rank r // 2, piece tp + r from rank (tp + r) // 2, a later rank: received in that order
    receive_sizes = [width if r in (rank // 2, (tp + rank) // 2) else 0 for r in range(tp)]
    send = torch.cat([pieces[i] for i in order])
    received = all_to_all_single_autograd(send, receive_sizes, send_sizes, mesh.get_group())
    return received.movedim(0, -1).contiguous()
