"""Gated DeltaNet mixer (Qwen3-Next's linear-attention layer): q, k, v through one causal short convolution,
the gated delta rule (soma_lightning/nn/ops/delta_rule/) over value heads, a per-head RMSNorm, a sigmoid
output gate. Documents in a packed window do not see each other: the convolution and the state restart at
every document start."""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import DecodeState, RecurrentCache
from soma_lightning.nn.ops.delta_rule import (
    CHUNK_SIZE,
    gated_delta_rule,
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
    sequence_bounds,
    short_conv,
)
from soma_lightning.nn.protocols import ComponentArgumentError, check_positive, linear_flops
from soma_lightning.nn.tensor_parallel import ParameterPlacements, local, local_segments


def document_resets(ctx: SequenceContext) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """[B, T] bool, True where a new document starts (never at position 0), and their `sequence_bounds`;
    None, None without document ids. Built once per forward pass and shared by all layers through ctx.delta_resets."""
    if ctx.doc_ids is None:
        return None, None
    if ctx.delta_resets is None:
        doc = ctx.doc_ids
        resets = F.pad(doc[:, 1:] != doc[:, :-1], (1, 0))
        ctx.delta_resets = resets, sequence_bounds(resets)
    return ctx.delta_resets


class GatedDeltaNet(nn.Module):
    """num_heads query/key heads of head_dim, num_v_heads value heads of v_head_dim (a multiple of
    num_heads: each q/k head serves num_v_heads // num_heads value heads). impl picks the delta rule's
    form (see `gated_delta_rule`); "recurrent" and "chunked" run the convolution in PyTorch too."""

    default_name = "gdn"

    def __init__(
        self, d_model: int, num_heads: int = 16, num_v_heads: int = 32, head_dim: int = 256, v_head_dim: int | None = None, conv_size: int = 4,
        norm_eps: float = 1e-6, impl: Literal["auto", "recurrent", "chunked", "fla"] = "auto",
    ) -> None:
        super().__init__()
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        check_positive(
            d_model=d_model, num_heads=num_heads, num_v_heads=num_v_heads, head_dim=head_dim, v_head_dim=v_head_dim, conv_size=conv_size,
            norm_eps=norm_eps,
        )
        if num_v_heads % num_heads:
            raise ComponentArgumentError("num_v_heads", f"must be a multiple of num_heads ({num_heads}), got {num_v_heads}")
        if impl not in ("auto", "recurrent", "chunked", "fla"):
            raise ComponentArgumentError("impl", f"expected auto, recurrent, chunked or fla, got {impl!r}")
        self.num_heads, self.num_v_heads, self.head_dim, self.v_head_dim = num_heads, num_v_heads, head_dim, v_head_dim
        self.impl = impl
        key_dim, value_dim = num_heads * head_dim, num_v_heads * v_head_dim
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.a_proj = nn.Linear(d_model, num_v_heads, bias=False)
        self.b_proj = nn.Linear(d_model, num_v_heads, bias=False)
        self.gate_proj = nn.Linear(d_model, value_dim, bias=False)
        self.out_proj = nn.Linear(value_dim, d_model, bias=False)
        # One depthwise convolution over concat(q, k, v), initialised as nn.Conv1d would be.
        bound = 1 / math.sqrt(conv_size)
        self.conv = nn.Parameter(torch.empty(2 * key_dim + value_dim, conv_size).uniform_(-bound, bound))
        # Decay g = -exp(A_log) * softplus(a + dt_bias), initialised as in Mamba2: A in [1, 16], dt
        # log-uniform in [1e-3, 1e-1].
        self.A_log = nn.Parameter(torch.empty(num_v_heads).uniform_(1, 16).log())
        dt = torch.empty(num_v_heads).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.norm = nn.RMSNorm(v_head_dim, eps=norm_eps)

    def _segments(self) -> list[int]:
        """The channels of q, k and v in the convolution's input, in order."""
        key_dim = self.num_heads * self.head_dim
        return [key_dim, key_dim, self.num_v_heads * self.v_head_dim]

    def _heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shards = sum(self._segments()) // qkv.shape[-1]  # 1, or tp on a tensor-parallel rank (its share of the heads)
        q, k, v = qkv.split([n // shards for n in self._segments()], dim=-1)
        q, k = q.unflatten(-1, (-1, self.head_dim)), k.unflatten(-1, (-1, self.head_dim))
        return q, k, v.unflatten(-1, (-1, self.v_head_dim))

    def forward(self, x: Tensor, ctx: SequenceContext) -> Tensor:
        inputs = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        beta = self.b_proj(x).sigmoid()
        g = -local(self.A_log).exp() * F.softplus(self.a_proj(x).float() + local(self.dt_bias))
        if ctx.decode is None:
            resets, bounds = document_resets(ctx)
            conv_impl = self.impl if self.impl in ("auto", "fla") else "torch"
            conv = local_segments(self.conv, self._segments())
            q, k, v = self._heads(short_conv(inputs, conv, resets, conv_impl, cu_seqlens=bounds))
            o = gated_delta_rule(q, k, v, g, beta, resets, impl=self.impl, cu_seqlens=bounds)
        else:
            o = self._continue(inputs, g, beta, ctx.decode)
        # The norm's weight in o's dtype: under autocast o is bf16, and a float32 weight would miss the fused kernel.
        o = F.rms_norm(o, self.norm.normalized_shape, local(self.norm.weight).to(o.dtype), self.norm.eps)
        o = o * self.gate_proj(x).unflatten(-1, (-1, self.v_head_dim)).sigmoid()
        return self.out_proj(o.flatten(-2))

    def prepare_context(self, ctx: SequenceContext) -> None:
        if ctx.decode is None:
            document_resets(ctx)

    def _continue(self, inputs: Tensor, g: Tensor, beta: Tensor, state: DecodeState) -> Tensor:
        """Incremental decoding in PyTorch: the convolution over the cached last inputs and the new ones, the
        delta rule from the cached state; step by step (the reference recurrence) for one token or when
        rollback needs every state, chunked otherwise (a prompt)."""
        cache = state.cache(self, lambda: RecurrentCache(self.conv.shape[1]))
        history = cache.conv_history()
        if history is not None:
            inputs = torch.cat([history, inputs], dim=1)
        n = g.shape[1]
        q, k, v = self._heads(short_conv(inputs, self.conv, impl="torch")[:, -n:])
        if n == 1 or state.keep_steps:
            o, states = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=cache.state, output_states=True)
        else:
            o, final = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=cache.state, output_final_state=True)
            states = final[:, None]
        cache.update(inputs, states, n)
        return o

    def flops_per_token(self, seq_len: int) -> float:
        """Projections plus the chunked delta rule's matrix work (chunks of CHUNK_SIZE, so not seq_len)."""
        projections = linear_flops(self)
        k, v, c = self.head_dim, self.v_head_dim, CHUNK_SIZE
        # Per value head: w S, q S and the state update (2KV each); q k^T, A and the products with delta,
        # then the solves for u and w (about 2C(K + V) each).
        return projections + self.num_v_heads * (3 * 2 * k * v + 2 * 2 * c * (k + v))

    def tensor_parallel_plan(self, tp: int) -> dict[str, ParallelStyle]:
        """Heads split over the ranks (each rank's value heads with the q/k heads they read): the
        projections column-wise, the output row-wise, the decay parameters by head, the convolution's q, k
        and v channels and the head norm read whole and applied to this rank's heads."""
        if self.num_heads % tp:
            raise ComponentArgumentError("num_heads", f"{self.num_heads} heads do not split over tp={tp} tensor-parallel ranks")
        plan: dict[str, ParallelStyle] = {name: ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "gate_proj")}
        return plan | {
            "out_proj": RowwiseParallel(), "": ParameterPlacements(A_log=Shard(0), dt_bias=Shard(0), conv=Replicate()),
            "norm": ParameterPlacements(weight=Replicate()),
        }
