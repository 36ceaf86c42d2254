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
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import KVCache
from soma_lightning.nn.differential import Differential
from soma_lightning.nn.graph_distance import graph_depth, landmark_distance, landmark_hops
from soma_lightning.nn.ops.attention.differential import rope_halves
from soma_lightning.nn.ops.attention.flex import flex
from soma_lightning.nn.ops.attention.reference import masked_attention_reference
from soma_lightning.nn.ops.slot_gather import slot_gather
from soma_lightning.nn.protocols import ComponentArgumentError, check_positive, linear_flops
from soma_lightning.nn.rope import apply_rope, interleaved_rope_tables, rope_tables
from soma_lightning.nn.semantic_graph import EDGE_TYPES, AttentionGraph, SemanticGraph, attention_graph
from soma_lightning.nn.tensor_parallel import ParameterPlacements, local



def slot_bias(edge_bias: Tensor, edge_type: Tensor) -> Tensor:
    """[H, len(EDGE_TYPES)] table, [B, T, E] edge types -> [B, H, T, E] score bias per slot (empty slots
    read type 0; they are masked anyway)."""
    return edge_bias[:, edge_type.clamp(min=0)].transpose(0, 1)


def gather_attention(
    q: Tensor, k: Tensor, v: Tensor, neighbors: Tensor, bias: Tensor, dropout_p: float = 0.0, weights: list | None = None
) -> Tensor:
    """q [B, H, T, hd], k, v [B, H, S, hd] (S >= T: incremental decoding's queries are the last T of S
    positions; v may be wider than q and k), neighbors [B, T, E], bias [B, H, T, E] -> [B, H, T, hd_v]: softmax over each query's E slots
    only, scores in float32. `weights`: a list to append the softmax weights [B, H, T, E] to."""
    b, h, _, hd = k.shape
    t, e = neighbors.shape[1:]
    index = neighbors.clamp(min=0).view(b, 1, t * e, 1)
    k_slots = slot_gather(k, index).view(b, h, t, e, hd)
    v_slots = slot_gather(v, index).view(b, h, t, e, v.shape[-1])
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


class GraphDecodeCache(KVCache):
    """Incremental decoding's keys and values, and the hop distances of the positions so far (graph RoPE,
    the landmark bias): a new position's distances continue them."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.depth: Tensor | None = None  # [B, T]
        self.hops: Tensor | None = None  # [B, T, M]

    def rollback(self, length: int) -> None:
        super().rollback(length)
        self.depth = None if self.depth is None else self.depth[:, :length]
        self.hops = None if self.hops is None else self.hops[:, :length]


class GraphAttention(nn.Module):
    """Multi-head attention along the edges of `ctx.semantic_graph` (put there by the model before
    the layers run), RoPE on q/k, plus a learned bias per (head, edge type), zero at the start. impl "auto"
    is "gather". "flex" has no backward on CPU: the CPU tests check its forward, only GPU tests its
    training, and no attention dropout (dropout > 0 with it is refused).

    Options (graph_distance.py defines the distances): `rope_positions` "graph" rotates q/k by each
    position's hop depth in the graph instead of its index, "both" the even-indexed frequencies by the index
    and the odd-indexed by the depth. `landmark_every`: landmarks at every landmark_every-th position, and a
    learned bias per head and landmark distance of the edge (0 .. landmark_buckets - 1, the last shared by
    all farther), zero at the start. `differential`: differential attention over the edges (nn/differential.py).
    A graph with the semantic state's learned `edge_gate` adds it to every slot's score (not with flex)."""

    default_name = "attention"

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int | None = None,
        rope_base: float = 10000.0,
        dropout: float = 0.0,
        impl: Literal["auto", "gather", "flex", "reference"] = "auto",
        differential: bool = False,
        lambda_init: float = 0.8,
        rope_positions: Literal["token", "graph", "both"] = "token",
        landmark_every: int | None = None,
        landmark_buckets: int = 16,
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
        if rope_positions not in ("token", "graph", "both"):
            raise ComponentArgumentError("rope_positions", f"expected token, graph or both, got {rope_positions}")
        if landmark_every is not None and landmark_every <= 0:
            raise ComponentArgumentError("landmark_every", f"must be positive or null, got {landmark_every}")
        if landmark_every is not None and impl == "flex":
            raise ComponentArgumentError("landmark_every", "impl 'flex' has no landmark bias; use impl 'gather'")
        if not 2 <= landmark_buckets <= 256:
            raise ComponentArgumentError("landmark_buckets", f"need 2 to 256 buckets, got {landmark_buckets}")
        self.num_heads, self.head_dim, self.rope_base = num_heads, head_dim, rope_base
        self.dropout, self.impl = dropout, impl
        self.differential = Differential(head_dim, lambda_init) if differential else None
        self.rope_dim = head_dim // 2 if differential else head_dim
        if rope_positions == "both" and self.rope_dim < 4:
            raise ComponentArgumentError("rope_positions", f"'both' needs a rotary dim of at least 4, got {self.rope_dim}")
        self.rope_positions, self.landmark_every, self.landmark_buckets = rope_positions, landmark_every, landmark_buckets
        self.landmark_bias = nn.Parameter(torch.zeros(num_heads, landmark_buckets)) if landmark_every is not None else None
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
        q = self.q_proj(x).view(b, t, -1, self.head_dim)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        edge_bias = local(self.edge_bias)
        cache = None if ctx.decode is None else ctx.decode.cache(self, lambda: GraphDecodeCache(ctx.decode.capacity))
        depth, hops = self._distances(graph, cache)
        cos, sin = self._rope_tables(ctx, depth)
        rope = apply_rope if self.differential is None else rope_halves
        q, k = rope(q, cos, sin).transpose(1, 2), rope(k, cos, sin).transpose(1, 2)
        self.last_edges_per_token = (graph.neighbors >= 0).sum().detach() / (b * t)
        bias = self._slot_bias(graph, edge_bias, hops)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None:  # the new positions' edges, into the cached keys
            k, v = cache.extend(k, v)
            maps = [] if ctx.decode.record_attention else None
            y = self._attend(lambda qh, kh: gather_attention(qh, kh, v, graph.neighbors, bias, weights=maps), q, k)
            if maps:
                weights = maps[0] if self.differential is None else self.differential.combine(maps)
                columns = graph.neighbors.masked_fill(graph.neighbors < 0, k.shape[2])[:, None].expand_as(weights)
                dense = weights.new_zeros(b, weights.shape[1], t, k.shape[2] + 1).scatter_(-1, columns, weights)
                ctx.decode.attention[self] = dense[..., :-1]
        elif self.impl == "flex":
            if isinstance(graph, AttentionGraph) and graph.edge_gate is not None:
                raise ValueError("graph_attention impl 'flex' cannot add the semantic state's learned edge_gate; use impl 'gather'")
            score_mod = graph_score_mod(graph.neighbors, graph.edge_type.clamp(min=0), edge_bias)
            mask = _flex_block_mask(ctx)
            y = self._attend(lambda qh, kh: flex(qh, kh, v, mask, score_mod, FLEX_BACKWARD_TILES), q, k)
        elif self.impl == "reference":
            mask, dense_bias = dense_graph(graph.neighbors, bias)
            if self.differential is None:
                y = masked_attention_reference(q, k, v, mask, dense_bias, dropout_p)
            else:
                y = self.differential.reference(q, k, v, mask, dense_bias, dropout_p)
        else:
            y = self._attend(lambda qh, kh: gather_attention(qh, kh, v, graph.neighbors, bias, dropout_p), q, k)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def _attend(self, attend, q: Tensor, k: Tensor) -> Tensor:
        """attend(q, k) -> [B, H, T, hd], or differential attention through it."""
        return attend(q, k) if self.differential is None else self.differential(attend, q, k)

    def _slot_bias(self, graph: SemanticGraph | AttentionGraph, edge_bias: Tensor, hops: Tensor | None) -> Tensor:
        """[B, H, T, E]: the edge-type bias, plus the landmark-distance bias and the learned edge gate where on."""
        bias = slot_bias(edge_bias, graph.edge_type)
        if hops is not None:
            bucket = landmark_distance(hops, graph.neighbors, self.landmark_buckets - 1)
            bias = bias + local(self.landmark_bias)[:, bucket].transpose(0, 1)
        gate = graph.edge_gate if isinstance(graph, AttentionGraph) else None
        return bias if gate is None else bias + gate[:, None].to(bias.dtype)

    def _distances(self, graph: SemanticGraph | AttentionGraph, cache: GraphDecodeCache | None) -> tuple[Tensor | None, Tensor | None]:
        """The queries' graph depths [B, T] (graph RoPE) and the landmark hops [B, S, M] of all positions so
        far, each None when unused. Without decoding they are shared through graph.distances (filled by
        prepare_context); while decoding each layer continues its own from its cache."""
        depth = hops = None
        cap = self.landmark_buckets - 1
        if self.rope_positions == "token" and self.landmark_every is None:
            return depth, hops
        if cache is not None:
            if self.rope_positions != "token":
                cache.depth = graph_depth(graph.neighbors, cache.depth)
                depth = cache.depth[:, -graph.neighbors.shape[1] :]
            if self.landmark_every is not None:
                cache.hops = hops = landmark_hops(graph.neighbors, self.landmark_every, cap, cache.hops)
            return depth, hops
        store = graph.distances if isinstance(graph, AttentionGraph) and graph.distances is not None else {}
        if self.rope_positions != "token":
            if "depth" not in store:
                store["depth"] = graph_depth(graph.neighbors)
            depth = store["depth"]
        if self.landmark_every is not None:
            key = ("landmark_hops", self.landmark_every, cap)
            if key not in store:
                store[key] = landmark_hops(graph.neighbors, self.landmark_every, cap)
            hops = store[key]
        return depth, hops

    def _rope_tables(self, ctx: SequenceContext, depth: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.rope_positions == "token":
            return ctx.rope(self.rope_dim, self.rope_base)
        if self.rope_positions == "graph":
            return rope_tables(depth, self.rope_dim, self.rope_base)
        return interleaved_rope_tables(ctx.positions, depth, self.rope_dim, self.rope_base)

    def prepare_context(self, ctx: SequenceContext) -> None:
        if self.rope_positions != "graph":
            ctx.rope(self.rope_dim, self.rope_base)
        if ctx.decode is None:
            if self.impl == "flex":
                _flex_block_mask(ctx)
            if self.rope_positions != "token" or self.landmark_every is not None:
                graph = _graph(ctx)
                if not isinstance(graph, AttentionGraph) or graph.distances is None:
                    ctx.semantic_graph = graph = attention_graph(graph, distances={})
                self._distances(graph, None)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections plus QK^T and AV over the edges per query of the last graph seen (16 before any); AV
        twice with `differential`."""
        projections = sum(linear_flops(p) for p in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))
        maps = 1 if self.differential is None else 2
        return projections + (2 + 2 * maps) * float(self.last_edges_per_token) * self.num_heads * self.head_dim

    def tensor_parallel_plan(self, tp: int) -> dict[str, ParallelStyle]:
        """Heads split over the ranks: q, k, v column-wise, o row-wise, the edge bias by head."""
        if self.num_heads % tp:
            raise ComponentArgumentError("num_heads", f"{self.num_heads} heads do not split over tp={tp} tensor-parallel ranks")
        return {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel(), "": ParameterPlacements(edge_bias=Shard(0))}
