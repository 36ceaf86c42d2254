"""The causal per-sequence graph that SOSM attends over, built from each token's 64-dim semantic MU state.

MU is read as 16 named 4-dim blocks (MU_BLOCKS, contiguous, in that order). Query i of batch row b gets
E = 2 + F + top_k slots of key positions j <= i (-1 for an empty slot), each slot an edge of a type:
    self        j = i, always slot 0
    previous    j = i - 1 (empty at i = 0)
    fibonacci   j = i - d for the first F Fibonacci distances d = 2, 3, 5, 8, ... below T (empty if j < 0)
    semantic    the top_k keys j <= i - 2, at no Fibonacci distance, most similar to i (sorted by score)
so every edge appears once. The similarity of i and j is sum_b w_b cos_b(i, j) over the chosen blocks b of
the (optionally EMA-smoothed) state, optionally through a fixed random projection, optionally gated by
exp(-(i - j) / temporal_gate): the score. A candidate becomes an edge when its score exceeds the threshold,
its slot is within the query's adaptive K, and, with `mutual`, when it passes the causal reverse test
(see `GraphConfig`).

`build_graph` streams: queries in chunks of C = chunk_size, and for each chunk the keys in chunks of C,
merged into a running top-K (and, for adaptive K, an online-softmax entropy). Memory is O(B * C * (C + K))
for the scan and O(B * C * K * C) for the mutual test; no [B, T, T] tensor ever exists.
`dense_topk_reference` computes the same graph from the full [B, T, T] scores, for tests.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

MU_BLOCKS: tuple[str, ...] = ("I", "D", "R1", "R2", "K", "M", "T", "P", "S", "C", "N", "X", "E", "F", "A", "Z")
BLOCK_DIM = 4
EDGE_TYPES = ("self", "previous", "fibonacci", "semantic")  # edge_type codes 0..3; -1 marks an empty slot
PROJECTION_SEED = 0


@dataclass
class GraphConfig:
    """How to build the graph.

    top_k          semantic neighbours per token (the maximum when adaptive)
    threshold      a semantic edge's score must exceed it (-inf: no threshold)
    blocks         MU block name -> positive weight w_b of its cosine in the similarity
    fibonacci      add the Fibonacci back-shortcuts, at most max_fibonacci of them
    mutual         keep the candidate i -> j only if, among the positions p in (j, i] that could have j as
                   a semantic candidate, fewer than top_k score higher as p -> j than i does: i is in j's
                   top-K "forward" list, looking no further than i (so the test stays causal)
    adaptive_k     (K_min, K_max): query i keeps its best round(K_min + (K_max - K_min) * H_i) candidates
                   (half to even), H_i the entropy of the softmax of its candidates' scores over
                   log(number of candidates), 0 with fewer than two candidates
    projection_dim project the weighted blocks through a fixed random orthonormal matrix (seeded) first
    temporal_gate  tau: scores are similarity * exp(-(i - j) / tau)
    ema            smooth the state causally first: s_t = ema * s_{t-1} + (1 - ema) * x_t, s_{-1} = 0
    chunk_size     queries (and keys) per streaming chunk
    """

    top_k: int = 8
    threshold: float = 0.3
    blocks: dict[str, float] = field(default_factory=lambda: {"I": 0.5, "R2": 0.3, "K": 0.2})
    fibonacci: bool = True
    max_fibonacci: int = 12
    mutual: bool = False
    adaptive_k: tuple[int, int] | None = None
    projection_dim: int | None = None
    temporal_gate: float | None = None
    ema: float | None = None
    chunk_size: int = 512

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k: must be at least 1, got {self.top_k}")
        if math.isnan(self.threshold):
            raise ValueError(f"threshold: expected a number, got {self.threshold}")
        unknown = [name for name in self.blocks if name not in MU_BLOCKS]
        if not self.blocks or unknown:
            raise ValueError(f"blocks: expected a non-empty mapping of names from {MU_BLOCKS}, got {self.blocks}")
        if not all(0 < w < math.inf for w in self.blocks.values()):
            raise ValueError(f"blocks: weights must be positive and finite, got {self.blocks}")
        if self.max_fibonacci < 1:
            raise ValueError(f"max_fibonacci: must be at least 1, got {self.max_fibonacci}")
        if self.adaptive_k is not None:
            if len(self.adaptive_k) != 2 or not 0 <= self.adaptive_k[0] <= self.adaptive_k[1] <= self.top_k:
                raise ValueError(f"adaptive_k: expected 0 <= K_min <= K_max <= top_k ({self.top_k}), got {self.adaptive_k}")
        width = BLOCK_DIM * len(self.blocks)
        if self.projection_dim is not None and not 1 <= self.projection_dim <= width:
            raise ValueError(f"projection_dim: must be in 1..{width} (4 per chosen block) or null, got {self.projection_dim}")
        if self.temporal_gate is not None and not self.temporal_gate > 0:
            raise ValueError(f"temporal_gate: must be positive or null, got {self.temporal_gate}")
        if self.ema is not None and not 0 <= self.ema < 1:
            raise ValueError(f"ema: must be in [0, 1) or null, got {self.ema}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: must be at least 1, got {self.chunk_size}")


class SemanticGraph(NamedTuple):
    """Edges per query slot: neighbors and edge_type [B, T, E] int64 (-1 for an empty slot); provenance
    [B, T, E, len(cfg.blocks)]: the terms w_b cos_b(i, j) of a semantic edge's similarity (before gate and
    projection), in the order of cfg.blocks; 0 for the other slots."""

    neighbors: Tensor
    edge_type: Tensor
    provenance: Tensor


class AttentionGraph(NamedTuple):
    """A SemanticGraph's fields and what the attention layers read besides: edge_gate [B, T, E], the semantic
    state's learned temporal gate as log sigmoid, added to each slot's attention score (None: no gate);
    distances, values derived from the edges that the layers of one forward pass share, by key (None: none
    yet; graph_attention's hop distances)."""

    neighbors: Tensor
    edge_type: Tensor
    provenance: Tensor
    edge_gate: Tensor | None = None
    distances: dict | None = None


def attention_graph(graph: "SemanticGraph | AttentionGraph", **fields) -> AttentionGraph:
    """`graph` as an AttentionGraph, with `fields` (edge_gate, distances) replaced."""
    if not isinstance(graph, AttentionGraph):
        graph = AttentionGraph(graph.neighbors, graph.edge_type, graph.provenance)
    return graph._replace(**fields)


def causal_ema(x: Tensor, decay: float, chunk_size: int) -> Tensor:
    """[B, T, D] -> [B, T, D]: s_t = decay * s_{t-1} + (1 - decay) * x_t, s_{-1} = 0. Chunk by chunk, each
    one [C, C] matmul with the decay powers plus the carry from the previous chunk."""
    steps = torch.arange(chunk_size, device=x.device)
    lag = (steps[:, None] - steps[None, :]).to(x.dtype)
    within = torch.where(lag >= 0, decay ** lag.clamp(min=0), 0.0) * (1 - decay)  # [C, C]
    carried = decay ** (steps + 1).to(x.dtype)  # [C]
    out, carry = [], x.new_zeros(x.shape[0], 1, x.shape[2])
    for t0 in range(0, x.shape[1], chunk_size):
        chunk = x[:, t0 : t0 + chunk_size]
        c = chunk.shape[1]
        carry = within[:c, :c] @ chunk + carried[:c, None] * carry[:, -1:]
        out.append(carry)
    return torch.cat(out, dim=1)


def semantic_blocks(state: Tensor, cfg: GraphConfig) -> Tensor:
    """[B, T, 64] -> [B, T, len(cfg.blocks), 4]: the chosen blocks of the (smoothed) state, each L2-normalised
    and scaled by sqrt(w_b), so that block b's dot product between two tokens is w_b cos_b."""
    if state.dim() != 3 or state.shape[-1] != len(MU_BLOCKS) * BLOCK_DIM:
        raise ValueError(f"state: expected [B, T, {len(MU_BLOCKS) * BLOCK_DIM}], got {list(state.shape)}")
    x = state.to(torch.promote_types(state.dtype, torch.float32))
    x = x.unflatten(-1, (len(MU_BLOCKS), BLOCK_DIM))[:, :, [MU_BLOCKS.index(name) for name in cfg.blocks]]
    if cfg.ema is not None:
        x = causal_ema(x.flatten(-2), cfg.ema, cfg.chunk_size).view_as(x)
    weights = torch.tensor(list(cfg.blocks.values()), dtype=x.dtype, device=x.device)
    return F.normalize(x, dim=-1) * weights.sqrt()[:, None]


def _features(blocks: Tensor, cfg: GraphConfig) -> Tensor:
    """[B, T, n, 4] -> [B, T, D]: the vectors whose dot products are the similarities."""
    u = blocks.flatten(-2)
    if cfg.projection_dim is None:
        return u
    # Drawn on the CPU in float64 from a fixed seed: the same matrix on every device and call.
    generator = torch.Generator().manual_seed(PROJECTION_SEED)
    gaussian = torch.randn(u.shape[-1], cfg.projection_dim, generator=generator, dtype=torch.float64)
    return u @ torch.linalg.qr(gaussian).Q.to(u)


def _fibonacci(t: int, cfg: GraphConfig, device: torch.device) -> Tensor:
    """The Fibonacci distances 2, 3, 5, 8, ... below t, at most cfg.max_fibonacci (none when off)."""
    distances, a, b = [], 2, 3
    while cfg.fibonacci and a < t and len(distances) < cfg.max_fibonacci:
        distances.append(a)
        a, b = b, a + b
    return torch.tensor(distances, dtype=torch.long, device=device)


def _scores(dot: Tensor, q: Tensor, k: Tensor, cfg: GraphConfig, fib: Tensor) -> Tensor:
    """Similarities `dot` of queries at positions q and keys at positions k (broadcastable) -> scores, gated,
    -inf where k is no semantic candidate of q (not k <= q - 2, or at a Fibonacci distance)."""
    distance = q - k
    if cfg.temporal_gate is not None:
        dot = dot * torch.exp(-distance.clamp(min=0).to(dot.dtype) / cfg.temporal_gate)
    candidate = (distance >= 2) & ~torch.isin(distance, fib)
    return dot.masked_fill(~candidate, float("-inf"))


def _normalised_entropy(entropy: Tensor, n: Tensor) -> Tensor:
    """Entropy over log(n) for n candidates; 0 with fewer than two."""
    return torch.where(n >= 2, entropy / n.clamp(min=2).to(entropy.dtype).log(), 0.0)


def _select(scores: Tensor, keys: Tensor, entropy: Tensor | None, rank: Tensor | None, cfg: GraphConfig) -> Tensor:
    """Top-K candidates (scores sorted descending, key positions [B, C, K]) -> semantic neighbours [B, C, K],
    -1 where the threshold, the adaptive K (from the normalised entropy [B, C]) or the mutual test (rank: how
    many later positions beat the query as j's forward neighbour) drops the candidate."""
    keep = scores > cfg.threshold
    if entropy is not None:
        k_min, k_max = cfg.adaptive_k
        k = torch.round(k_min + (k_max - k_min) * entropy)
        keep = keep & (torch.arange(cfg.top_k, device=keys.device) < k[..., None])
    if rank is not None:
        keep = keep & (rank < cfg.top_k)
    return torch.where(keep, keys, -1)


def _assemble(blocks: Tensor, semantic: Tensor, cfg: GraphConfig, fib: Tensor, start: int = 0) -> SemanticGraph:
    """The structural slots in front of the semantic neighbours [B, T, K] of the queries from `start` on,
    and the provenance."""
    b, t, _ = semantic.shape
    offsets = torch.cat([torch.tensor([0, 1], device=fib.device), fib])
    structural = torch.arange(start, start + t, device=fib.device)[:, None] - offsets
    neighbors = torch.cat([structural.clamp(min=-1).expand(b, -1, -1), semantic], dim=-1)
    types = torch.tensor([0, 1] + [2] * len(fib) + [3] * cfg.top_k, device=fib.device)
    edge_type = torch.where(neighbors >= 0, types, -1)
    rows = torch.arange(b, device=fib.device)[:, None, None]
    terms = (blocks[rows, semantic.clamp(min=0)] * blocks[:, start:, None]).sum(-1)  # [B, T, K, n]
    terms = terms * (semantic >= 0)[..., None]
    provenance = torch.cat([terms.new_zeros(b, t, len(offsets), terms.shape[-1]), terms], dim=2)
    return SemanticGraph(neighbors, edge_type, provenance)


def _stream_rank(u: Tensor, scores: Tensor, keys: Tensor, q0: int, q1: int, cfg: GraphConfig, fib: Tensor) -> Tensor:
    """For each candidate i -> j of queries q0..q1-1 (scores, key positions [B, C, K]): how many p in (j, i)
    score higher as p -> j, scanning p chunk by chunk."""
    queries = torch.arange(q0, q1, device=u.device)[:, None, None]
    key_vectors = u[torch.arange(u.shape[0], device=u.device)[:, None, None], keys]  # [B, C, K, D]
    rank = torch.zeros_like(keys)
    for p0 in range(0, q1 - 1, cfg.chunk_size):
        p1 = min(p0 + cfg.chunk_size, q1 - 1)
        later = torch.arange(p0, p1, device=u.device)
        s = _scores(torch.einsum("bckd,bpd->bckp", key_vectors, u[:, p0:p1]), later, keys[..., None], cfg, fib)
        rank += ((s > scores[..., None]) & (later < queries)).sum(-1)
    return rank


def _stream_queries(u: Tensor, q0: int, q1: int, cfg: GraphConfig, fib: Tensor) -> Tensor:
    """Semantic neighbours [B, q1 - q0, K] of queries q0..q1-1: a running top-K over key chunks."""
    b, c = u.shape[0], q1 - q0
    queries = torch.arange(q0, q1, device=u.device)[:, None]
    scores = u.new_full((b, c, cfg.top_k), float("-inf"))
    keys = torch.zeros(b, c, cfg.top_k, dtype=torch.long, device=u.device)
    # Online softmax statistics of all candidates: running max m, sum z of exp(s - m), sum zs of exp(s - m) * s.
    m = u.new_full((b, c), float("-inf"))
    z, zs, n = u.new_zeros(b, c), u.new_zeros(b, c), torch.zeros(b, c, dtype=torch.long, device=u.device)
    for k0 in range(0, q1 - 2, cfg.chunk_size):  # semantic keys satisfy j <= i - 2
        k1 = min(k0 + cfg.chunk_size, q1 - 2)
        chunk_keys = torch.arange(k0, k1, device=u.device)
        s = _scores(u[:, q0:q1] @ u[:, k0:k1].mT, queries, chunk_keys, cfg, fib)  # [B, C, k1 - k0]
        scores, top = torch.cat([scores, s], dim=-1).topk(cfg.top_k, dim=-1)
        keys = torch.cat([keys, chunk_keys.expand_as(s)], dim=-1).gather(-1, top)
        if cfg.adaptive_k is not None:
            m_new = torch.maximum(m, s.amax(-1))
            rescale = torch.exp(m - m_new).nan_to_num(0.0)  # nan while no candidate was seen, both -inf
            p = torch.exp(s - m_new[..., None]).nan_to_num(0.0)
            z = z * rescale + p.sum(-1)
            zs = zs * rescale + (p * s.nan_to_num(neginf=0.0)).sum(-1)
            n, m = n + s.isfinite().sum(-1), m_new
    entropy = _normalised_entropy(m + z.log() - zs / z, n) if cfg.adaptive_k is not None else None
    rank = _stream_rank(u, scores, keys, q0, q1, cfg, fib) if cfg.mutual else None
    return _select(scores, keys, entropy, rank, cfg)


@torch.no_grad()
def build_graph(state: Tensor, cfg: GraphConfig, start: int = 0) -> SemanticGraph:
    """state [B, T, 64] -> the graph of each row, streamed (see the module docstring), for the queries from
    `start` on ([B, T - start, E]; incremental decoding asks for its new positions only, each against every
    earlier one). No gradient."""
    blocks = semantic_blocks(state, cfg)
    u = _features(blocks, cfg)
    t = state.shape[1]
    fib = _fibonacci(t, cfg, state.device)
    chunks = [_stream_queries(u, q0, min(q0 + cfg.chunk_size, t), cfg, fib) for q0 in range(start, t, cfg.chunk_size)]
    return _assemble(blocks, torch.cat(chunks, dim=1), cfg, fib, start)


@torch.no_grad()
def dense_topk_reference(state: Tensor, cfg: GraphConfig) -> SemanticGraph:
    """`build_graph` from the full [B, T, T] scores at once: the plain O(T^2) version, for tests. The two
    agree up to the order of exactly tied scores."""
    blocks = semantic_blocks(state, cfg)
    u = _features(blocks, cfg)
    b, t, _ = u.shape
    fib = _fibonacci(t, cfg, state.device)
    positions = torch.arange(t, device=state.device)
    all_scores = _scores(u @ u.mT, positions[:, None], positions, cfg, fib)  # [B, T, T], query by key
    scores, keys = all_scores.topk(min(cfg.top_k, t), dim=-1)
    scores = F.pad(scores, (0, cfg.top_k - scores.shape[-1]), value=float("-inf"))
    keys = F.pad(keys, (0, cfg.top_k - keys.shape[-1]))
    entropy = rank = None
    if cfg.adaptive_k is not None:
        entropy = torch.special.entr(all_scores.softmax(dim=-1)).sum(-1)
        entropy = _normalised_entropy(entropy, all_scores.isfinite().sum(-1))
    if cfg.mutual:
        columns = all_scores.mT[torch.arange(b, device=state.device)[:, None, None], keys]  # [B, T, K, T]: p -> j
        rank = ((columns > scores[..., None]) & (positions < positions[:, None, None])).sum(-1)
    return _assemble(blocks, _select(scores, keys, entropy, rank, cfg), cfg, fib)


def dense_adjacency(graph: SemanticGraph, t: int) -> Tensor:
    """[B, T, T] boolean mask, True where key j is one of query i's neighbours."""
    if graph.neighbors.shape[1] != t:
        raise ValueError(f"t: expected the graph's length {graph.neighbors.shape[1]}, got {t}")
    columns = graph.neighbors.masked_fill(graph.neighbors < 0, t)  # empty slots land in a spare last column
    mask = torch.zeros(graph.neighbors.shape[0], t, t + 1, dtype=torch.bool, device=graph.neighbors.device)
    return mask.scatter_(-1, columns, True)[..., :t]
