"""SOSM input: a per-token semantic "MU" state, read as named blocks, plus a temporal state, projected to d_model.

MU is 16 contiguous blocks of 4 dims each, in the order of MU_BLOCKS. The semantic graph
(semantic_graph.py) is built from MU and put in the sequence context for the graph attention layers; the
projected state is the residual stream's input.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import KVCache, causal_offset_mask
from soma_lightning.nn.protocols import ComponentArgumentError, check_positive
from soma_lightning.nn.semantic_graph import BLOCK_DIM, MU_BLOCKS, GraphConfig, build_graph

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
    off_diagonal = ~torch.eye(NUM_BLOCKS, dtype=torch.bool, device=mu.device)
    return gram[..., off_diagonal].pow(2).mean()


def variance_hinge(mu: Tensor) -> Tensor:
    """VICReg variance term: mean over MU dims of relu(1 - std over all batch * time positions)."""
    std = torch.sqrt(mu.flatten(0, -2).float().var(dim=0, correction=0) + 1e-4)  # eps keeps the gradient finite at std 0
    return F.relu(1 - std).mean()


class SemanticCache:
    """Incremental decoding's memory of the semantic state: MU of every position so far (the graph of a new
    position is built against it) and the block attention's keys and values."""

    def __init__(self, capacity: int) -> None:
        self.mu: Tensor | None = None  # [B, T, 64]
        self.block_kv = KVCache(capacity)

    def extend(self, mu: Tensor) -> Tensor:
        self.mu = mu if self.mu is None else torch.cat([self.mu, mu], dim=1)
        return self.mu

    def rollback(self, length: int) -> None:
        self.mu = self.mu[:, :length]
        self.block_kv.rollback(length)


class SemanticStateEmbedding(nn.Module):
    """The model's token embedding for SOSM: `forward(tokens, ctx)` returns x [B, T, d_model] and puts the
    semantic graph of MU (`graph`: GraphConfig fields) in ctx.semantic_graph; `embed(tokens)`
    returns (x, mu [B, T, 64]).

    MU is a factorised embedding (vocab -> factor_dim -> 64). With `block_attention`, each block also
    runs a tiny causal single-head attention over the sequence within its own dims, mixed in through a
    per-token, per-block sigmoid gate. The temporal state is a second per-token table, zero at the start
    (positions enter later, through RoPE in the attention layers). After each forward, `aux_loss` holds
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
        self.block_qkv = self.block_gate = None
        if block_attention:
            self.block_qkv = nn.Parameter(torch.randn(NUM_BLOCKS, BLOCK_DIM, 3 * BLOCK_DIM) / BLOCK_DIM**0.5)
            self.block_gate = nn.Linear(MU_DIM, NUM_BLOCKS)
        self.temporal = nn.Embedding(vocab_size, temporal_dim)
        nn.init.zeros_(self.temporal.weight)
        self.proj = nn.Linear(MU_DIM + temporal_dim, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.aux_loss: Tensor | None = None
        self.stats: dict[str, Tensor] = {}

    def block_mix(self, mu: Tensor, cache: SemanticCache | None = None) -> Tensor:
        """[B, T, 64] -> [B, T, 64]: mu + gate * (causal attention of each block with itself); with a cache,
        the T positions continue the cached ones."""
        qkv = torch.einsum("btnc,ncd->bntd", mu_blocks(mu), self.block_qkv)  # [B, 16, T, 3 * size]
        q, k, v = qkv.chunk(3, dim=-1)
        if cache is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start = cache.block_kv.length
            k, v = cache.block_kv.extend(k, v)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_offset_mask(start, q.shape[2], q.device))
        attended = attended.transpose(1, 2)
        gate = torch.sigmoid(self.block_gate(mu)).unsqueeze(-1)  # [B, T, 16, 1]
        return mu + (gate * attended).flatten(-2)

    def forward(self, tokens: Tensor, ctx: SequenceContext) -> Tensor:
        """With ctx.decode, `tokens` continue the decoded sequence: the graph rows of the new positions are
        built against MU of all positions so far (and kept in ctx.decode.graph for provenance)."""
        if ctx.decode is None:
            x, mu = self.embed(tokens)
            ctx.semantic_graph = build_graph(mu.detach(), self.graph)
            return x
        cache = ctx.decode.cache(self, lambda: SemanticCache(ctx.decode.capacity))
        x, mu = self.embed(tokens, cache)
        graph = build_graph(cache.extend(mu.detach()), self.graph, start=ctx.decode.start)
        ctx.semantic_graph = ctx.decode.graph = graph
        return x

    def embed(self, tokens: Tensor, cache: SemanticCache | None = None) -> tuple[Tensor, Tensor]:
        mu = self.mu_proj(self.factor(tokens))
        if self.block_qkv is not None:
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
