"""Expert parallelism (EP): the routed experts of every MoE layer sharded over the ranks of an ep group.

Each rank of the group holds num_experts / ep consecutive experts: `w_in` and `w_out` become DTensors,
Shard(0) over the expert dimension of the ep mesh, so that state dicts, parameter counts and
torch.distributed.checkpoint see the whole weights. The router, the shared experts and the rest of the
model are left as they are (whole, or split by tensor parallel: the experts' hidden units over tp, their
weights then DTensors on the (ep, tp) mesh). A forward routes this rank's tokens as on one device, then

1. exchanges the per-expert row counts (one all-to-all of num_experts integers) and reads them on the host
   for the split sizes (one host synchronisation per MoE layer and pass);
2. sends each (token, expert) row to the rank holding its expert (all-to-all, rows already grouped by
   expert, hence by destination rank);
3. runs the local experts with the one-device path (`MoE._run_experts`: grouped GEMM or the loop), on the
   received rows regrouped by local expert;
4. sends the results back by the reverse all-to-all; the MoE then combines them with the gates as before.

Both all-to-alls are differentiable (backward is the reverse all-to-all), so a token's gradient reaches the
rank it came from and an expert's weight gradient sums over the rows of every rank of the group.

Gradients and data parallelism. The ranks of an ep group are data-parallel ranks for everything but the
experts: they see different tokens, each computing the mean loss over its own, and the dense gradients
are averaged over all data-parallel ranks. The experts are not replicated within the ep group; an
expert's gradient arrives as the sum over the group's ranks' losses, ep times their average, so the
expert weights pass through a gradient scale of 1/ep. After it, an expert gradient is the average over its
ep group, and the data-parallel reduction over the ranks that hold the same experts (the replicas of the
ep group: the dp ranks outside it) averages the rest, as it does for dense parameters. With one ep group
spanning all data-parallel ranks, expert gradients need no further reduction.

Capacity (capacity_factor) counts this rank's tokens, as under plain data parallelism; dropped rows travel
with gate 0. The aux-free selection bias moves by this rank's load, as under data parallelism.
"""

import functools

import torch
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from soma_lightning.errors import UserError
from soma_lightning.nn.moe import MoE


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class ExpertParallel:
    """Mixed into an MoE's class by `apply_expert_parallel`: `_experts` runs on the ranks holding the experts."""

    ep_mesh: DeviceMesh

    def _experts(self, x: Tensor, counts: Tensor) -> Tensor:
        group, ep = self.ep_mesh.get_group(), self.ep_mesh.size()
        local = self.num_experts // ep
        # received[s * local + j]: rows that rank s sends to this rank's j-th expert
        received = all_to_all_single(counts, None, None, group).view(ep, local)
        sent = counts.view(ep, local).sum(dim=1)
        sizes = torch.cat([sent, received.sum(dim=1)]).tolist()
        send_sizes, receive_sizes = sizes[:ep], sizes[ep:]
        rows = all_to_all_single_autograd(x.contiguous(), receive_sizes, send_sizes, group)
        # Received rows come by source rank, then expert; the experts need them by expert (sources in order).
        expert = torch.repeat_interleave(torch.arange(ep * local, device=x.device) % local, received.reshape(-1))
        order = torch.argsort(expert, stable=True)
        w_in = _ScaleGradient.apply(self.w_in.to_local(), 1 / ep)
        w_out = _ScaleGradient.apply(self.w_out.to_local(), 1 / ep)
        y = self._run_experts(rows[order], received.sum(dim=0), w_in, w_out)
        back = torch.empty_like(y).index_copy(0, order, y)
        return all_to_all_single_autograd(back, send_sizes, receive_sizes, group)


@functools.cache
def _expert_parallel_class(cls: type) -> type:
    return type(f"ExpertParallel{cls.__name__}", (ExpertParallel, cls), {})


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, experts_mesh: DeviceMesh | None = None) -> None:
    """Shard the routed experts of every MoE in `model` over the 1-D `ep_mesh` (in place), and route their
    rows by all-to-all. Every rank must hold the same initial weights (as seeded runs do); rank 0's are
    used. Experts whose hidden units tensor parallel already split (DTensors on the tp mesh) become
    DTensors on `experts_mesh`, the (ep, tp) mesh: this rank's experts of its tp shard. A num_experts that
    ep does not divide is a UserError naming the key."""
    ep = ep_mesh.size()
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE) and not isinstance(m, ExpertParallel)]
    for name, moe in moes:
        if moe.num_experts % ep:
            raise UserError(
                f"ffn.num_experts: {moe.num_experts} experts ({name}) do not divide among ep={ep} expert-parallel ranks; "
                f"expected a multiple of {ep}"
            )
    for _, moe in moes:
        for attr in ("w_in", "w_out"):
            weight = getattr(moe, attr)
            if isinstance(weight, DTensor):
                block = weight.data.to_local().chunk(ep, dim=0)[ep_mesh.get_local_rank()].clone()
                placements = [Shard(0), *weight.placements]
                sharded = DTensor.from_local(block, experts_mesh, placements, run_check=False, shape=weight.shape, stride=weight.stride())
            else:
                sharded = distribute_tensor(weight.data, ep_mesh, [Shard(0)])
            setattr(moe, attr, nn.Parameter(sharded, requires_grad=weight.requires_grad))
        moe.ep_mesh = ep_mesh
        moe.__class__ = _expert_parallel_class(type(moe))
