"""Mixture-of-experts FFN: a linear router, top-k routing, optional capacity with token dropping, and
load balancing (Switch auxiliary loss, router z-loss, or the auxiliary-loss-free bias). `routing`
"expert_choice" and "soft" route per chunk, in causal forms (moe_routing.py).

Experts run either as one grouped GEMM over the tokens sorted by expert (`torch._grouped_mm`, bf16 on
Hopper) or as a plain loop over experts; both compute the same function.
"""

import math
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ParallelStyle

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.moe_routing import chunk_routed_forward
from soma_lightning.nn.protocols import ComponentArgumentError, check_positive
from soma_lightning.nn.tensor_parallel import ExpertHiddenParallel


@torch.library.custom_op("soma_lightning::segment_mm", mutates_args=())
def segment_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Rows of x [N, K] grouped by segment, counts[e] rows for segment e; w [E, K, M] -> [N, M], one matmul per
    segment. An opaque op to torch.compile: reading the counts on the host inside it neither breaks the graph
    nor makes the shapes depend on the routing."""
    outputs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        outputs.append(x[start : start + n] @ w[e])
        start += n
    return torch.cat(outputs)


@segment_mm.register_fake
def _(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("soma_lightning::segment_mm_weight_grad", mutates_args=())
def segment_mm_weight_grad(x: Tensor, grad: Tensor, counts: Tensor) -> Tensor:
    """The gradient of `segment_mm`'s w: x[rows of e]^T @ grad[rows of e] per segment -> [E, K, M]."""
    grads, start = [], 0
    for n in counts.tolist():
        grads.append(x[start : start + n].mT @ grad[start : start + n])
        start += n
    return torch.stack(grads)


@segment_mm_weight_grad.register_fake
def _(x: Tensor, grad: Tensor, counts: Tensor) -> Tensor:
    return x.new_empty(counts.shape[0], x.shape[1], grad.shape[1])


def _segment_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _segment_mm_backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x, w, counts = ctx.saved_tensors
    grad_x = segment_mm(grad, w.mT, counts) if ctx.needs_input_grad[0] else None
    grad_w = segment_mm_weight_grad(x, grad, counts) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


segment_mm.register_autograd(_segment_mm_backward, setup_context=_segment_mm_setup)


def expert_loop(x: Tensor, w_in: Tensor, w_out: Tensor, counts: Tensor, swiglu: bool) -> Tensor:
    """Reference: rows of x are sorted by expert, counts[e] rows for expert e; one matmul pair per expert."""
    return segment_mm(_activate(segment_mm(x, w_in, counts), swiglu), w_out, counts)


def expert_grouped(x: Tensor, w_in: Tensor, w_out: Tensor, counts: Tensor, swiglu: bool) -> Tensor:
    """The same function as `expert_loop`, as two grouped GEMMs (no host synchronisation)."""
    offsets = counts.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x, w_in, offs=offsets)
    return torch._grouped_mm(_activate(h, swiglu), w_out, offs=offsets)


def _activate(h: Tensor, swiglu: bool) -> Tensor:
    if swiglu:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class MoE(nn.Module):
    """Top-k routed experts. `capacity_factor` None is dropless; otherwise each expert takes at most
    ceil(capacity_factor * tokens * top_k / num_experts) assignments, earlier positions first (so that
    dropping stays causal), and a dropped assignment contributes nothing. Balancing: "switch" adds
    aux_loss_weight * E * sum_e(load_e * mean_prob_e); "aux_free" adds a per-expert bias to the selection
    scores only, moved by bias_update_rate towards equal load after each training step (no gradient);
    z_loss_weight * mean(logsumexp(logits)^2) in either case. After each forward, `aux_loss` holds the
    loss to add and `stats` the routing statistics."""

    default_name = "moe"

    def __init__(
        self,
        d_model: int,
        hidden_dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        activation: Literal["swiglu", "gelu"] = "swiglu",
        renormalize: bool = True,
        capacity_factor: float | None = None,
        balance: Literal["switch", "aux_free", "none"] = "switch",
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        bias_update_rate: float = 0.001,
        num_shared_experts: int = 0,
        impl: Literal["auto", "loop", "grouped"] = "auto",
        routing: Literal["top_k", "expert_choice", "soft"] = "top_k",
        routing_chunk: int = 64,
        slots_per_expert: int = 1,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ComponentArgumentError("num_experts", f"must be at least 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ComponentArgumentError("top_k", f"must be in 1..num_experts ({num_experts}), got {top_k}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ComponentArgumentError("capacity_factor", f"must be positive or null (dropless), got {capacity_factor}")
        check_positive(hidden_dim=hidden_dim, routing_chunk=routing_chunk, slots_per_expert=slots_per_expert)
        if routing != "top_k" and (capacity_factor is not None or balance == "aux_free"):
            raise ComponentArgumentError("routing", f"{routing!r} balances by itself: leave capacity_factor null and balance not 'aux_free'")
        # expert_choice and soft route chunk c by chunk c - routing_delay (moe_routing.py); 0 only in the leak test.
        self.routing, self.routing_chunk, self.slots_per_expert, self.routing_delay = routing, routing_chunk, slots_per_expert, 1
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.capacity_factor, self.balance = capacity_factor, balance
        self.aux_loss_weight, self.z_loss_weight, self.bias_update_rate = aux_loss_weight, z_loss_weight, bias_update_rate
        self.swiglu, self.impl = activation == "swiglu", impl
        self.router = nn.Linear(d_model, num_experts * (slots_per_expert if routing == "soft" else 1), bias=False)
        width_in = 2 * hidden_dim if self.swiglu else hidden_dim
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, width_in))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, d_model))
        # None without shared experts: an empty parameter would get no gradient, which DDP refuses and which
        # desynchronises FSDP2's gradient reduce-scatter.
        self.shared_in = nn.Parameter(torch.empty(num_shared_experts, d_model, width_in)) if num_shared_experts else None
        self.shared_out = nn.Parameter(torch.empty(num_shared_experts, hidden_dim, d_model)) if num_shared_experts else None
        for w in (self.w_in, self.shared_in):
            if w is not None:
                nn.init.uniform_(w, -1 / math.sqrt(d_model), 1 / math.sqrt(d_model))
        for w in (self.w_out, self.shared_out):
            if w is not None:
                nn.init.uniform_(w, -1 / math.sqrt(hidden_dim), 1 / math.sqrt(hidden_dim))
        self.register_buffer("selection_bias", torch.zeros(num_experts), persistent=True)
        self.aux_loss: Tensor | None = None
        self.stats: dict[str, Tensor] = {}

    def _experts(self, x: Tensor, counts: Tensor) -> Tensor:
        """Rows of x sorted by expert, counts[e] rows for expert e, through their experts. Expert parallelism
        overrides this method to send the rows to the ranks holding their experts (parallel/expert_parallel.py)."""
        return self._run_experts(x, counts, self.w_in, self.w_out)

    def _run_experts(self, x: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
        grouped = self.impl == "grouped" or (self.impl == "auto" and x.is_cuda and x.dtype == torch.bfloat16)
        run = expert_grouped if grouped else expert_loop
        return run(x, w_in.to(x.dtype), w_out.to(x.dtype), counts, self.swiglu)

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

    def shared_experts(self, flat: Tensor, dtype: torch.dtype) -> Tensor | float:
        """The shared experts' output for the tokens flat [N, D]; 0 without them."""
        out = 0.0
        for w_in, w_out in zip(self.shared_in, self.shared_out) if self.shared_in is not None else ():
            out = out + (_activate(flat.to(dtype) @ w_in.to(dtype), self.swiglu) @ w_out.to(dtype)).to(flat.dtype)
        return out

    def forward(self, x: Tensor, ctx: SequenceContext) -> Tensor:
        if self.routing != "top_k":
            return chunk_routed_forward(self, x, ctx)
        b, t, d = x.shape
        # Position-major order: every token at position <= p comes before any token at a later position.
        flat = x.transpose(0, 1).reshape(t * b, d)
        logits = self.router(flat).float()
        probs = logits.softmax(dim=-1)
        scores = probs + self.selection_bias if self.balance == "aux_free" else probs
        expert = scores.topk(self.top_k, dim=-1).indices  # [N, k]
        weight = probs.gather(-1, expert)
        if self.renormalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)

        expert_flat = expert.reshape(-1)  # assignment a = token * k + slot, in position-major order
        slots = expert_flat[:, None] == torch.arange(self.num_experts, device=x.device)  # [N * k, E]
        assigned = slots.sum(dim=0)  # not bincount: on CUDA it reads the maximum back to the host
        order = torch.argsort(expert_flat, stable=True)  # grouped by expert, earlier assignments first
        gate = weight.reshape(-1)
        keep = torch.ones_like(expert_flat, dtype=torch.bool)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * expert_flat.numel() / self.num_experts)
            rank = (slots.cumsum(dim=0) * slots).sum(dim=-1) - 1  # earlier assignments rank first
            keep = rank < capacity
            # A dropped assignment keeps its row with gate 0 rather than leaving the rows: shapes that follow
            # the routing would make torch.compile break the graph and recompile for every batch.
            gate = torch.where(keep, gate, 0.0)
        token = order // self.top_k
        dtype = self.compute_dtype(x)
        y = self._experts(flat[token].to(dtype), assigned)
        out = torch.zeros_like(flat).index_add_(0, token, (y * gate[order].unsqueeze(-1)).to(flat.dtype))
        out = out + self.shared_experts(flat, dtype)

        load = assigned.float() / expert_flat.numel()
        aux = self.z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).mean()
        if self.balance == "switch":
            aux = aux + self.aux_loss_weight * self.num_experts * (load * probs.mean(dim=0)).sum()
        self.aux_loss = aux
        self.stats = {"tokens_per_expert": assigned.detach(), "dropped_fraction": 1 - keep.float().mean().detach()}
        return out.view(t, b, d).transpose(0, 1)

    def aux_losses(self) -> dict[str, Tensor]:
        return {} if self.aux_loss is None else {"moe_aux_loss": self.aux_loss}

    def aux_metrics(self) -> dict[str, Tensor]:
        """moe_max_load: the busiest expert's share of assignments over the mean share."""
        if not self.stats:
            return {}
        load = self.stats["tokens_per_expert"].float()
        return {"moe_max_load": load.max() / load.mean(), "moe_dropped_fraction": self.stats["dropped_fraction"]}

    def after_train_batch(self) -> None:
        self.update_selection_bias()

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Dropless for the duration: capacity dropping depends on how many tokens share the pass, so a
        cache could not reproduce it (generation/decoders.py)."""
        saved, self.capacity_factor = self.capacity_factor, None
        try:
            yield
        finally:
            self.capacity_factor = saved

    @torch.no_grad()
    def update_selection_bias(self) -> None:
        """Aux-loss-free balancing (after an optimizer step): raise the bias of under-loaded experts, lower
        that of over-loaded ones, by bias_update_rate."""
        if self.balance != "aux_free" or "tokens_per_expert" not in self.stats:
            return
        load = self.stats["tokens_per_expert"].float()
        self.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def expert_parameters(self) -> int:
        """Parameters of one routed expert, from the shapes alone: indexing an expert out of an FSDP2-sharded
        weight (`self.w_in[0]`) would be an all-gather, and these counts are taken on rank zero only."""
        return (self.w_in.numel() + self.w_out.numel()) // self.num_experts

    def inactive_parameters(self) -> int:
        """Soft routing runs every expert for every chunk; expert choice gives a token top_k on average."""
        return 0 if self.routing == "soft" else (self.num_experts - self.top_k) * self.expert_parameters()

    def flops_per_token(self, seq_len: int) -> float:
        per_expert = 2 * self.expert_parameters()
        shared = 0 if self.shared_in is None else 2 * (self.shared_in.numel() + self.shared_out.numel())
        # soft: num_experts * slots_per_expert slot rows per routing_chunk tokens
        routed = self.num_experts * self.slots_per_expert / self.routing_chunk if self.routing == "soft" else self.top_k
        return 2 * self.router.weight.numel() + routed * per_expert + shared

    def tensor_parallel_plan(self, tp: int) -> dict[str, ParallelStyle]:
        """Every expert's hidden units (routed and shared) split over the ranks, the router whole
        (nn/tensor_parallel.py's ExpertHiddenParallel); composes with expert parallel's split of the experts."""
        if self.w_out.shape[1] % tp:
            raise ComponentArgumentError("hidden_dim", f"{self.w_out.shape[1]} does not split over tp={tp} tensor-parallel ranks")
        return {"": ExpertHiddenParallel()}
