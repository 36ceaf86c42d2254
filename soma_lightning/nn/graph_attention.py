"""Causal attention over the per-sequence semantic graph of SOSM (semantic_graph.py).

Query i of row b attends only to its neighbours graph.neighbors[b, i, :] (key positions j <= i, -1 for an
empty slot, the self edge always present), each score shifted by a learned bias per head and edge type.
Neighbours within a row must be distinct. Three equal forms:
    gather     keys and values gathered per (query, slot): O(T * E) memory, CPU and GPU ("auto")
    flex       FlexAttention, the graph as block mask and the bias as score_mod (CUDA)
    reference  a dense [B, T, T] mask and [B, H, T, T] bias scattered from the edge lists (tests)
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import KVCache
from soma_lightning.nn.ops.attention.flex import flex
from soma_lightning.nn.ops.attention.reference import masked_attention_reference
from soma_lightning.nn.protocols import ComponentArgumentError, check_positive
from soma_lightning.nn.rope import apply_rope
from soma_lightning.nn.semantic_graph import EDGE_TYPES



def slot_bias(edge_bias: Tensor, edge_type: Tensor) -> Tensor:
    """[H, len(EDGE_TYPES)] table, [B, T, E] edge types -> [B, H, T, E] score bias per slot (empty slots
    read type 0; they are masked anyway)."""
    return edge_bias[:, edge_type.clamp(min=0)].transpose(0, 1)


def gather_attention(
    q: Tensor, k: Tensor, v: Tensor, neighbors: Tensor, bias: Tensor, dropout_p: float = 0.0, weights: list | None = None
) -> Tensor:
    """q [B, H, T, hd], k, v [B, H, S, hd] (S >= T: incremental decoding's queries are the last T of S
    positions), neighbors [B, T, E], bias [B, H, T, E] -> [B, H, T, hd]: softmax over each query's E slots
    only, scores in float32. `weights`: a list to append the softmax weights [B, H, T, E] to."""
    b, h, _, hd = k.shape
    t, e = neighbors.shape[1:]
    index = neighbors.clamp(min=0).view(b, 1, t * e, 1).expand(b, h, t * e, hd)
    k_slots = k.gather(2, index).view(b, h, t, e, hd)
    v_slots = v.gather(2, index).view(b, h, t, e, hd)
    scores = torch.einsum("bhtd,bhted->bhte", q, k_slots).float() / math.sqrt(hd) + bias.float()
    scores = scores.masked_fill(neighbors[:, None] < 0, float("-inf"))
    probs = scores.softmax(dim=-1)
    if weights is not None:
        weights.append(probs)
    return torch.einsum("bhte,bhted->bhtd", F.dropout(probs, dropout_p).to(v.dtype), v_slots)


def dense_graph(neighbors: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """neighbors [B, T, E], bias [B, H, T, E] -> ([B, 1, T, T] bool mask, [B, H, T, T] bias). Empty slots
    scatter into a spare last column, then dropped, so they never overwrite an edge."""
    b, h, t, e = bias.shape
    columns = neighbors.masked_fill(neighbors < 0, t)
    mask = torch.zeros(b, t, t + 1, dtype=torch.bool, device=neighbors.device).scatter_(2, columns, True)
    dense = bias.new_zeros(b, h, t, t + 1).scatter(3, columns[:, None].expand(b, h, t, e), bias)
    return mask[:, None, :, :t], dense[..., :t]


def graph_block_mask(neighbors: Tensor):
    """The graph as a FlexAttention BlockMask: kv visible from q when it is one of q's E neighbours."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t, e = neighbors.shape

    def mask_mod(b_idx, h, q_idx, kv_idx):
        hit = neighbors[b_idx, q_idx, 0] == kv_idx
        for slot in range(1, e):
            hit = hit | (neighbors[b_idx, q_idx, slot] == kv_idx)
        return hit

    return create_block_mask(mask_mod, b, None, t, t, device=neighbors.device)


# The score_mod's captured graph tensors make the default backward tiles overflow shared memory at head_dim
# 128 on H100 (297 KB asked, 232 KB there); half-height tiles fit.
FLEX_BACKWARD_TILES = {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}


def graph_score_mod(neighbors: Tensor, edge_type: Tensor, edge_bias: Tensor):
    """The per-(head, edge type) bias as a FlexAttention score_mod: find the type of the edge q -> kv among
    q's slots (kv off the graph reads type 0; the block mask hides it), then read `edge_bias` [H, types]
    once. FlexAttention's backward allows only one indexing of a tensor that needs gradients."""

    def score_mod(score, b, h, q_idx, kv_idx):
        kind = torch.zeros_like(kv_idx)
        for slot in range(neighbors.shape[-1]):
            kind = torch.where(neighbors[b, q_idx, slot] == kv_idx, edge_type[b, q_idx, slot], kind)
        return score + edge_bias[h, kind]

    return score_mod


def _graph(ctx: SequenceContext):
    if ctx.semantic_graph is None:
        raise RuntimeError("GraphAttention needs ctx.semantic_graph: build the semantic graph before the layers run")
    return ctx.semantic_graph


def _flex_block_mask(ctx: SequenceContext):
    """The graph's block mask, built once per forward pass and shared by the layers."""
    if ctx.semantic_graph_block_mask is None:
        ctx.semantic_graph_block_mask = graph_block_mask(_graph(ctx).neighbors)
    return ctx.semantic_graph_block_mask


class GraphAttention(nn.Module):
    """Multi-head attention along the edges of `ctx.semantic_graph` (put there by the model before
    the layers run), RoPE on q/k, plus a learned bias per (head, edge type), zero at the start. impl "auto"
    is "gather". "flex" has no backward on CPU: the CPU tests check its forward, only GPU tests its
    training, and no attention dropout (dropout > 0 with it is refused)."""

    default_name = "attention"

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int | None = None,
        rope_base: float = 10000.0,
        dropout: float = 0.0,
        impl: Literal["auto", "gather", "flex", "reference"] = "auto",
    ) -> None:
        super().__init__()
        check_positive(num_heads=num_heads)
        head_dim = head_dim or d_model // num_heads
        if head_dim <= 0 or head_dim % 2:
            raise ComponentArgumentError("head_dim", f"must be positive and even for RoPE, got {head_dim}")
        if impl not in ("auto", "gather", "flex", "reference"):
            raise ComponentArgumentError("impl", f"expected auto, gather, flex or reference, got {impl}")
        if impl == "flex" and dropout > 0:
            raise ComponentArgumentError("dropout", f"impl 'flex' has no attention dropout, got {dropout}; use impl 'gather', or dropout 0")
        self.num_heads, self.head_dim, self.rope_base = num_heads, head_dim, rope_base
        self.dropout, self.impl = dropout, impl
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=False)
        self.edge_bias = nn.Parameter(torch.zeros(num_heads, len(EDGE_TYPES)))
        # Kept as a tensor after a forward (reading it back would sync the device on every forward); 16 before any.
        self.last_edges_per_token: Tensor | float = 16.0

    def forward(self, x: Tensor, ctx: SequenceContext) -> Tensor:
        graph = _graph(ctx)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rope(self.head_dim, self.rope_base)
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        self.last_edges_per_token = (graph.neighbors >= 0).sum().detach() / (b * t)
        if ctx.decode is not None:  # the new positions' edges, into the cached keys
            k, v = ctx.decode.cache(self, lambda: KVCache(ctx.decode.capacity)).extend(k, v)
            weights = [] if ctx.decode.record_attention else None
            y = gather_attention(q, k, v, graph.neighbors, slot_bias(self.edge_bias, graph.edge_type), weights=weights)
            if weights:
                columns = graph.neighbors.masked_fill(graph.neighbors < 0, k.shape[2])[:, None].expand_as(weights[0])
                dense = weights[0].new_zeros(b, self.num_heads, t, k.shape[2] + 1).scatter_(-1, columns, weights[0])
                ctx.decode.attention[self] = dense[..., :-1]
        elif self.impl == "flex":
            score_mod = graph_score_mod(graph.neighbors, graph.edge_type.clamp(min=0), self.edge_bias)
            y = flex(q, k, v, _flex_block_mask(ctx), score_mod, FLEX_BACKWARD_TILES)
        elif self.impl == "reference":
            mask, bias = dense_graph(graph.neighbors, slot_bias(self.edge_bias, graph.edge_type))
            y = masked_attention_reference(q, k, v, mask, bias, self.dropout if self.training else 0.0)
        else:
            bias = slot_bias(self.edge_bias, graph.edge_type)
            y = gather_attention(q, k, v, graph.neighbors, bias, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def prepare_context(self, ctx: SequenceContext) -> None:
        ctx.rope(self.head_dim, self.rope_base)
        if self.impl == "flex" and ctx.decode is None:
            _flex_block_mask(ctx)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections plus QK^T and AV over the edges per query of the last graph seen (16 before any)."""
        projections = 2 * sum(p.weight.numel() for p in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))
        return projections + 4 * float(self.last_edges_per_token) * self.num_heads * self.head_dim
