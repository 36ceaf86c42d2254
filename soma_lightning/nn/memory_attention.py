"""Memory attention: causal attention within the current chunk plus the top-k keys of every earlier chunk,
retrieved by approximate nearest-neighbour search in an HNSW index (hnswlib), as extra keys and values.

The sequence is cut into chunks of C positions. Chunk c's keys are written to the memory once the chunk is
complete, and the queries of chunk c + 1 onwards may retrieve them: position t reads the memory of the chunks
before its own (every entry at a position < C * (t // C) <= t), so the layer is causal. Query i attends over
    local    the positions of its own chunk up to i (C slots, later ones empty; same document only)
    memory   the top_k entries of the earlier chunks most similar to it (empty while fewer exist)
in one softmax, with RoPE on q and k and a learned bias per head and slot kind (local, memory).

Retrieval compares the concatenation of all heads' q with that of all heads' k before RoPE (their dot
product is the sum over heads of the attention scores without position), one index per batch row, shared by
the heads. Selection has no gradient, as the semantic graph's top-k; the retrieved keys and values are this
forward pass's own k and v at the retrieved positions, so the gradient reaches them: nothing is stored from
earlier steps, so nothing stale is read (a memory of earlier batches would have to be detached).

    hnsw   one hnswlib index per row, built chunk by chunk with one thread (deterministic: the same
           insertions in the same order give the same graph, so cached decoding equals a full pass)
    exact  brute-force top-k over the same entries: the reference (tests compare the two)
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import KVCache
from soma_lightning.nn.graph_attention import gather_attention
from soma_lightning.nn.protocols import ComponentArgumentError, check_positive
from soma_lightning.nn.rope import apply_rope

SLOT_KINDS = ("local", "memory")


def _sorted_positions(found: Tensor) -> Tensor:
    """[..., K] positions, -1 for none -> ascending, the -1s last: the slot layout no longer depends on the
    order in which a search returned its neighbours."""
    big = torch.iinfo(found.dtype).max
    ordered = found.masked_fill(found < 0, big).sort(dim=-1).values
    return ordered.masked_fill(ordered == big, -1)


class ChunkMemory:
    """The retrieval keys [B, T, D] of the positions so far and, for impl "hnsw", one index per row holding
    the complete chunks added so far. `search(queries, chunk)` first adds every chunk before `chunk`."""

    def __init__(self, chunk_size: int, top_k: int, impl: str, ef_search: int, ef_construction: int, hnsw_m: int) -> None:
        self.chunk_size, self.top_k, self.impl = chunk_size, top_k, impl
        self.ef_search, self.ef_construction, self.hnsw_m = ef_search, ef_construction, hnsw_m
        self.keys: Tensor | None = None
        self.indexes: list | None = None
        self.chunks = 0  # chunks in the indexes

    def extend(self, keys: Tensor) -> None:
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=1)

    def rollback(self, length: int) -> None:
        self.keys = self.keys[:, :length]
        if self.chunks * self.chunk_size > length:  # an indexed chunk lost positions: rebuild on the next search
            self.indexes, self.chunks = None, 0

    def search(self, queries: Tensor, chunk: int) -> Tensor:
        """queries [B, n, D] of positions in chunk `chunk` -> memory positions [B, n, top_k], ascending, -1 for
        an empty slot."""
        entries = chunk * self.chunk_size
        b, n, _ = queries.shape
        if entries == 0:
            return torch.full((b, n, self.top_k), -1, dtype=torch.long, device=queries.device)
        k = min(self.top_k, entries)
        if self.impl == "exact":
            scores = queries.float() @ self.keys[:, :entries].float().mT
            found = scores.topk(k, dim=-1).indices
        else:
            found = self._hnsw(queries, chunk, k)
        found = F.pad(found, (0, self.top_k - k), value=-1)
        return _sorted_positions(found)

    def _hnsw(self, queries: Tensor, chunk: int, k: int) -> Tensor:
        import hnswlib

        b, _, dim = queries.shape
        if self.indexes is None:
            self.indexes = []
            for _ in range(b):
                index = hnswlib.Index(space="ip", dim=dim)
                index.init_index(max_elements=max(chunk, 4) * self.chunk_size, ef_construction=self.ef_construction, M=self.hnsw_m, random_seed=0)
                self.indexes.append(index)
        keys = self.keys.detach().float().cpu().numpy() if self.chunks < chunk else None
        for c in range(self.chunks, chunk):
            start, end = c * self.chunk_size, (c + 1) * self.chunk_size
            for row, index in enumerate(self.indexes):
                if end > index.get_max_elements():
                    index.resize_index(2 * end)
                index.add_items(keys[row, start:end], list(range(start, end)), num_threads=1)
        self.chunks = max(self.chunks, chunk)
        q = queries.detach().float().cpu().numpy()
        found = []
        for row, index in enumerate(self.indexes):
            index.set_ef(max(self.ef_search, k))
            labels, _ = index.knn_query(q[row], k=k, num_threads=1)
            found.append(torch.from_numpy(labels.astype("int64")))
        return torch.stack(found).to(queries.device)


class MemoryAttention(nn.Module):
    """Chunk-local causal attention plus retrieved memory of the earlier chunks (module docstring).
    impl "hnsw" needs hnswlib (`pip install 'soma-lightning[memory]'`); "exact" is the brute-force reference."""

    default_name = "attention"

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int | None = None,
        chunk_size: int = 64,
        top_k: int = 16,
        rope_base: float = 10000.0,
        dropout: float = 0.0,
        impl: Literal["hnsw", "exact"] = "hnsw",
        ef_search: int = 64,
        ef_construction: int = 100,
        hnsw_m: int = 16,
    ) -> None:
        super().__init__()
        check_positive(num_heads=num_heads, chunk_size=chunk_size, top_k=top_k, ef_search=ef_search, ef_construction=ef_construction, hnsw_m=hnsw_m)
        head_dim = head_dim or d_model // num_heads
        if head_dim <= 0 or head_dim % 2:
            raise ComponentArgumentError("head_dim", f"must be positive and even for RoPE, got {head_dim}")
        if impl not in ("hnsw", "exact"):
            raise ComponentArgumentError("impl", f"expected hnsw or exact, got {impl!r}")
        if impl == "hnsw":
            try:
                import hnswlib  # noqa: F401
            except ImportError:
                raise ComponentArgumentError("impl", "'hnsw' needs hnswlib (pip install 'soma-lightning[memory]'); or use impl 'exact'") from None
        self.num_heads, self.head_dim, self.rope_base, self.dropout = num_heads, head_dim, rope_base, dropout
        self.chunk_size, self.top_k, self.impl = chunk_size, top_k, impl
        self.search_args = (ef_search, ef_construction, hnsw_m)
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=False)
        self.slot_bias = nn.Parameter(torch.zeros(num_heads, len(SLOT_KINDS)))

    def new_memory(self) -> ChunkMemory:
        return ChunkMemory(self.chunk_size, self.top_k, self.impl, *self.search_args)

    def slots(self, queries: Tensor, memory: ChunkMemory, start: int, doc_ids: Tensor | None = None) -> Tensor:
        """Each query's key positions [B, n, C + top_k] (-1: empty) for the queries [B, n, D] at positions
        start..start+n-1; the memory holds the retrieval keys of every position up to the last query."""
        b, n, _ = queries.shape
        c = self.chunk_size
        position = torch.arange(start, start + n, device=queries.device)
        local = (position // c * c)[:, None] + torch.arange(c, device=queries.device)  # [n, C]
        visible = local <= position[:, None]
        if doc_ids is not None:
            rows = torch.arange(b, device=queries.device)[:, None, None]
            visible = visible & (doc_ids[rows, local.clamp(max=doc_ids.shape[1] - 1)] == doc_ids[:, position, None])
        local = torch.where(visible, local, -1).expand(b, n, c)
        found = []
        for chunk in range(start // c, (start + n - 1) // c + 1):
            i0, i1 = max(chunk * c, start) - start, min((chunk + 1) * c, start + n) - start
            found.append(memory.search(queries[:, i0:i1], chunk))
        return torch.cat([local, torch.cat(found, dim=1)], dim=-1)

    def forward(self, x: Tensor, ctx: SequenceContext) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        retrieval_q, retrieval_k = q.detach().flatten(-2), k.detach().flatten(-2)
        cos, sin = ctx.rope(self.head_dim, self.rope_base)
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        if ctx.decode is None:
            memory, start = self.new_memory(), 0
            memory.extend(retrieval_k)
            neighbors = self.slots(retrieval_q, memory, 0, ctx.doc_ids)
        else:
            cache = ctx.decode.cache(self, lambda: MemoryCache(ctx.decode.capacity, self.new_memory()))
            k, v = cache.kv.extend(k, v)
            cache.memory.extend(retrieval_k)
            start = ctx.decode.start
            neighbors = self.slots(retrieval_q, cache.memory, start)
        bias = self.slot_bias[:, (torch.arange(neighbors.shape[-1], device=x.device) >= self.chunk_size).long()]  # [H, E]
        y = gather_attention(q, k, v, neighbors, bias[None, :, None].expand(b, -1, t, -1), self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def prepare_context(self, ctx: SequenceContext) -> None:
        ctx.rope(self.head_dim, self.rope_base)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections, QK^T and AV over the local and memory slots, and the retrieval dot products of an
        exact search over half the sequence on average (HNSW visits fewer)."""
        projections = 2 * sum(p.weight.numel() for p in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))
        width = self.num_heads * self.head_dim
        return projections + 4 * (self.chunk_size / 2 + self.top_k) * width + 2 * width * seq_len / 2


class MemoryCache:
    """Cached decoding's state of a memory attention layer: keys and values (after RoPE) and the memory."""

    def __init__(self, capacity: int, memory: ChunkMemory) -> None:
        self.kv, self.memory = KVCache(capacity), memory

    def rollback(self, length: int) -> None:
        self.kv.rollback(length)
        self.memory.rollback(length)
