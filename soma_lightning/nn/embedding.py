"""Embeddings added to the token embedding."""

import torch
from torch import Tensor, nn

from soma_lightning.nn.protocols import ComponentArgumentError, check_positive
from soma_lightning.token_space import modality_of

_PRIME = 2_147_483_647  # 2^31 - 1: products below stay inside int64
_MULTIPLIERS = (1_000_003, 998_244_353 % _PRIME, 911_382_323, 972_663_749, 1_234_567_891 % _PRIME, 1_610_612_741 % _PRIME, 805_306_457, 402_653_189)


class HashedNgramEmbedding(nn.Module):
    """Identity embeddings: for each n in `ngram_sizes` and each of `num_tables` hash functions, the n tokens
    ending at each position (positions before the start read as a boundary mark) hash to one of `buckets`
    rows of that table; the rows of all tables are summed. Causal by construction, deterministic (a fixed
    polynomial hash modulo 2^31 - 1)."""

    def __init__(self, d_model: int, ngram_sizes: tuple[int, ...] = (2, 3, 4), num_tables: int = 2, buckets: int = 65536) -> None:
        super().__init__()
        if not ngram_sizes or min(ngram_sizes) < 1:
            raise ComponentArgumentError("ngram_sizes", f"need sizes >= 1, got {ngram_sizes}")
        if not 1 <= num_tables <= len(_MULTIPLIERS):
            raise ComponentArgumentError("num_tables", f"must be in 1..{len(_MULTIPLIERS)}, got {num_tables}")
        check_positive(buckets=buckets)
        self.ngram_sizes, self.num_tables, self.buckets = list(ngram_sizes), num_tables, buckets
        self.lookback = max(ngram_sizes) - 1  # earlier tokens a position's embedding reads
        self.tables = nn.ModuleList(nn.Embedding(buckets, d_model) for _ in range(len(ngram_sizes) * num_tables))
        for table in self.tables:
            nn.init.normal_(table.weight, std=0.02)

    def bucket_ids(self, tokens: Tensor) -> list[Tensor]:
        """One [B, T] tensor of row indices per table, in the order of `tables`."""
        ids = []
        for n in self.ngram_sizes:
            shifted = [torch.nn.functional.pad(tokens + 1, (i, 0))[:, : tokens.shape[1]] for i in range(n)]  # 0 = boundary
            for table in range(self.num_tables):
                h = torch.zeros_like(tokens)
                for s in shifted:
                    h = (h * _MULTIPLIERS[table] + s) % _PRIME
                ids.append(h % self.buckets)
        return ids

    def forward(self, tokens: Tensor) -> Tensor:
        return sum(table(ids) for table, ids in zip(self.tables, self.bucket_ids(tokens)))


class ModalityEmbedding(nn.Module):
    """A learned vector per declared vocabulary range (model.arch.vocab_ranges), added to every token of it."""

    def __init__(self, d_model: int, vocab_ranges: dict[str, list[int]] | None = None) -> None:
        super().__init__()
        if not vocab_ranges:
            raise ComponentArgumentError("vocab_ranges", "the modality embedding needs model.arch.vocab_ranges")
        self.ranges = dict(vocab_ranges)
        self.lookback = 0
        self.table = nn.Embedding(len(self.ranges), d_model)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table(modality_of(tokens, self.ranges))
