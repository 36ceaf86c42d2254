"""SOSM input: a per-token semantic "MU" state, read as named blocks, plus a temporal state, projected to d_model.

MU is 16 contiguous blocks of 4 dims each, in the order of MU_BLOCKS. The semantic graph
(semantic_graph.py) is built from MU and put in the sequence context for the graph attention layers; the
projected state is the residual stream's input.
"""

from collections import defaultdict
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import KVCache, causal_offset_mask
from soma_lightning.nn.protocols import ComponentArgumentError, check_positive
from soma_lightning.nn.semantic_graph import BLOCK_DIM, MU_BLOCKS, GraphConfig, attention_graph, build_graph

NUM_BLOCKS = len(MU_BLOCKS)
MU_DIM = NUM_BLOCKS * BLOCK_DIM


def mu_blocks(mu: Tensor) -> Tensor:
    """[B, T, 64] -> [B, T, 16, 4], block n the n-th contiguous slice."""
    return mu.unflatten(-1, (NUM_BLOCKS, BLOCK_DIM))


def block_orthogonality(mu: Tensor) -> Tensor:
    """Mean over positions and over the off-diagonal entries of the squared cosine-similarity (Gram) matrix
    of a position's blocks: 0 when every block points elsewhere."""
    blocks = F.normalize(mu_blocks(mu), dim=-1)
    gram = blocks @ blocks.transpose(-1, -2)  # [B, T, 16, 16]
    # a mask multiplied in, not boolean indexing: the memory plan traces this with fake tensors, which cannot
    # give boolean indexing's output shape
    off_diagonal = 1 - torch.eye(NUM_BLOCKS, dtype=gram.dtype, device=mu.device)
    return (gram.pow(2) * off_diagonal).sum(dim=(-2, -1)).mean() / (NUM_BLOCKS * (NUM_BLOCKS - 1))


def variance_hinge(mu: Tensor) -> Tensor:
    """VICReg variance term: mean over MU dims of relu(1 - std over all batch * time positions)."""
    std = torch.sqrt(mu.flatten(0, -2).float().var(dim=0, correction=0) + 1e-4)  # eps keeps the gradient finite at std 0
    return F.relu(1 - std).mean()


class SemanticCache:
    """Incremental decoding's memory of the semantic state: MU of every position so far (the graph of a new
    position is built against it), the temporal state (the learned edge gate reads the keys'), and the block
    attention's keys and values (per block group head with `block_groups`)."""

    def __init__(self, capacity: int) -> None:
        self.mu: Tensor | None = None  # [B, T, 64]
        self.temporal: Tensor | None = None  # [B, T, temporal_dim], with the learned edge gate
        self.block_kv = KVCache(capacity)
        self.group_kv: defaultdict[int, KVCache] = defaultdict(lambda: KVCache(capacity))

    def extend(self, mu: Tensor) -> Tensor:
        self.mu = mu if self.mu is None else torch.cat([self.mu, mu], dim=1)
        return self.mu

    def extend_temporal(self, temporal: Tensor) -> Tensor:
        self.temporal = temporal if self.temporal is None else torch.cat([self.temporal, temporal], dim=1)
        return self.temporal

    def rollback(self, length: int) -> None:
        self.mu = self.mu[:, :length]
        self.temporal = None if self.temporal is None else self.temporal[:, :length]
        self.block_kv.rollback(length)
        for kv in self.group_kv.values():
            kv.rollback(length)


def block_heads(groups: list[list[str]]) -> list[list[int]]:
    """Block groups (MU block names) -> the block attention's heads as lists of block indices: each group one
    head, then every block in no group a head of its own. ValueError for an unknown or repeated name."""
    names = [name for group in groups for name in group]
    unknown = [name for name in names if name not in MU_BLOCKS]
    if unknown or len(set(names)) != len(names) or not all(groups):
        raise ValueError(f"expected non-empty lists of distinct names from {MU_BLOCKS}, got {groups}")
    grouped = [[MU_BLOCKS.index(name) for name in group] for group in groups]
    return grouped + [[n] for n in range(NUM_BLOCKS) if n not in set(sum(grouped, []))]


class SemanticStateEmbedding(nn.Module):
    """The model's token embedding for SOSM: `forward(tokens, ctx)` returns x [B, T, d_model] and puts the
    semantic graph of MU (`graph`: GraphConfig fields) in ctx.semantic_graph; `embed(tokens)`
    returns (x, mu [B, T, 64]).

    MU is a factorised embedding (vocab -> factor_dim -> 64). With `block_attention`, each block also
    runs a tiny causal single-head attention over the sequence within its own dims, mixed in through a
    per-token, per-block sigmoid gate; `block_groups` (lists of MU block names) gives each group one head over
    its blocks' dims together instead, the blocks in no group keeping a head each. `edge_gate` "learned":
    each graph edge i -> j gets a learned gate sigmoid(w . [temporal_i, temporal_j, log(1 + i - j)] + b)
    whose log the graph attention layers add to the edge's score (graph.edge_gate); "fixed" (the default)
    leaves the edges to the graph's fixed `temporal_gate` decay, if any. The temporal state is a second
    per-token table, zero at the start (positions enter later, through RoPE in the attention layers). After each forward, `aux_loss` holds
    orthogonality_weight * block_orthogonality + variance_weight * variance_hinge of MU, and `stats` both
    terms, detached."""

    def __init__(
        self,
        d_model: int,
        vocab_size: int,
        factor_dim: int = 32,
        temporal_dim: int = 32,
        block_attention: bool = False,
        orthogonality_weight: float = 0.01,
        variance_weight: float = 0.01,
        dropout: float = 0.0,
        graph: dict[str, Any] | None = None,
        block_groups: list[list[str]] | None = None,
        edge_gate: Literal["fixed", "learned"] = "fixed",
    ) -> None:
        super().__init__()
        try:
            self.graph = GraphConfig(**(graph or {}))
        except (TypeError, ValueError) as e:
            raise ComponentArgumentError("graph", str(e)) from None
        check_positive(d_model=d_model, vocab_size=vocab_size, factor_dim=factor_dim, temporal_dim=temporal_dim)
        for name, value in (("orthogonality_weight", orthogonality_weight), ("variance_weight", variance_weight)):
            if value < 0:
                raise ComponentArgumentError(name, f"must be >= 0, got {value}")
        if not 0 <= dropout < 1:
            raise ComponentArgumentError("dropout", f"must be in [0, 1), got {dropout}")
        self.orthogonality_weight, self.variance_weight = orthogonality_weight, variance_weight
        self.factor = nn.Embedding(vocab_size, factor_dim)
        self.mu_proj = nn.Linear(factor_dim, MU_DIM, bias=False)
        if block_groups is not None and not block_attention:
            raise ComponentArgumentError("block_groups", "needs block_attention: true")
        if edge_gate not in ("fixed", "learned"):
            raise ComponentArgumentError("edge_gate", f"expected fixed or learned, got {edge_gate}")
        self.block_qkv = self.block_gate = self.group_qkv = None
        self.block_heads: list[list[int]] | None = None
        if block_attention and block_groups is None:
            self.block_qkv = nn.Parameter(torch.randn(NUM_BLOCKS, BLOCK_DIM, 3 * BLOCK_DIM) / BLOCK_DIM**0.5)
        elif block_attention:
            try:
                self.block_heads = block_heads(block_groups)
            except ValueError as e:
                raise ComponentArgumentError("block_groups", str(e)) from None
            widths = [BLOCK_DIM * len(head) for head in self.block_heads]
            self.group_qkv = nn.ParameterList(nn.Parameter(torch.randn(w, 3 * w) / w**0.5) for w in widths)
        if block_attention:
            self.block_gate = nn.Linear(MU_DIM, NUM_BLOCKS)
        self.temporal = nn.Embedding(vocab_size, temporal_dim)
        nn.init.zeros_(self.temporal.weight)
        self.edge_gate = None
        if edge_gate == "learned":
            # Zero weights: at the start every edge of a query has the same gate, which the softmax cancels.
            self.edge_gate = nn.Linear(2 * temporal_dim + 1, 1)
            nn.init.zeros_(self.edge_gate.weight)
            nn.init.constant_(self.edge_gate.bias, 3.0)
        self.proj = nn.Linear(MU_DIM + temporal_dim, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.aux_loss: Tensor | None = None
        self.stats: dict[str, Tensor] = {}

    def block_mix(self, mu: Tensor, cache: SemanticCache | None = None) -> Tensor:
        """[B, T, 64] -> [B, T, 64]: mu + gate * (causal attention of each block with itself, or of each block
        group's head); with a cache, the T positions continue the cached ones."""
        if self.block_heads is not None:
            attended = self.group_mix(mu, cache)
        else:
            qkv = torch.einsum("btnc,ncd->bntd", mu_blocks(mu), self.block_qkv)  # [B, 16, T, 3 * size]
            attended = _causal_attention(*qkv.chunk(3, dim=-1), None if cache is None else cache.block_kv).transpose(1, 2)
        gate = torch.sigmoid(self.block_gate(mu)).unsqueeze(-1)  # [B, T, 16, 1]
        return mu + (gate * attended).flatten(-2)

    def group_mix(self, mu: Tensor, cache: SemanticCache | None = None) -> Tensor:
        """[B, T, 64] -> [B, T, 16, 4]: each block group head's causal attention over its blocks' dims, read
        back per block."""
        blocks, parts = mu_blocks(mu), []
        for head, (index, qkv) in enumerate(zip(self.block_heads, self.group_qkv)):
            q, k, v = (blocks[:, :, index].flatten(-2) @ qkv).unsqueeze(1).chunk(3, dim=-1)  # [B, 1, T, width]
            attended = _causal_attention(q, k, v, None if cache is None else cache.group_kv[head])
            parts.append(attended.squeeze(1).unflatten(-1, (len(index), BLOCK_DIM)))
        order = sum(self.block_heads, [])
        return torch.cat(parts, dim=2)[:, :, sorted(range(NUM_BLOCKS), key=order.__getitem__)]

    def temporal_edge_gate(self, temporal: Tensor, neighbors: Tensor) -> Tensor:
        """temporal [B, S, temporal_dim] of all positions, neighbors [B, n, E] of the last n -> [B, n, E]: log
        of each edge's learned gate."""
        b, n, _ = neighbors.shape
        start = temporal.shape[1] - n
        keys = temporal[torch.arange(b, device=neighbors.device)[:, None, None], neighbors.clamp(min=0)]  # [B, n, E, dim]
        lag = (torch.arange(start, start + n, device=neighbors.device)[:, None] - neighbors).clamp(min=0)
        features = torch.cat([temporal[:, start:, None].expand_as(keys), keys, torch.log1p(lag.to(keys.dtype))[..., None]], dim=-1)
        return F.logsigmoid(self.edge_gate(features).squeeze(-1))

    def forward(self, tokens: Tensor, ctx: SequenceContext) -> Tensor:
        """With ctx.decode, `tokens` continue the decoded sequence: the graph rows of the new positions are
        built against MU of all positions so far (and kept in ctx.decode.graph for provenance)."""
        if ctx.decode is None:
            x, mu = self.embed(tokens)
            graph = build_graph(mu.detach(), self.graph)
            if self.edge_gate is not None:
                graph = attention_graph(graph, edge_gate=self.temporal_edge_gate(self.temporal(tokens), graph.neighbors))
            ctx.semantic_graph = graph
            return x
        cache = ctx.decode.cache(self, lambda: SemanticCache(ctx.decode.capacity))
        x, mu = self.embed(tokens, cache)
        graph = build_graph(cache.extend(mu.detach()), self.graph, start=ctx.decode.start)
        if self.edge_gate is not None:
            graph = attention_graph(graph, edge_gate=self.temporal_edge_gate(cache.extend_temporal(self.temporal(tokens)), graph.neighbors))
        ctx.semantic_graph = ctx.decode.graph = graph
        return x

    def embed(self, tokens: Tensor, cache: SemanticCache | None = None) -> tuple[Tensor, Tensor]:
        mu = self.mu_proj(self.factor(tokens))
        if self.block_gate is not None:
            mu = self.block_mix(mu, cache)
        x = self.drop(self.norm(self.proj(torch.cat([mu, self.temporal(tokens)], dim=-1))))

        orthogonality, variance = block_orthogonality(mu), variance_hinge(mu)
        terms = ((self.orthogonality_weight, orthogonality), (self.variance_weight, variance))
        self.aux_loss = sum((weight * term for weight, term in terms if weight), mu.new_zeros(()))
        self.stats = {"orthogonality": orthogonality.detach(), "variance": variance.detach()}
        return x, mu

    def aux_losses(self) -> dict[str, Tensor]:
        return {} if self.aux_loss is None else {"state_aux_loss": self.aux_loss}

    def aux_metrics(self) -> dict[str, Tensor]:
        return {f"state_{name}": value for name, value in self.stats.items()}


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None) -> Tensor:
    """Causal SDPA over [B, heads, T, dim]; with a cache, the T queries continue its keys."""
    if cache is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    start = cache.length
    k, v = cache.extend(k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_offset_mask(start, q.shape[2], q.device))
