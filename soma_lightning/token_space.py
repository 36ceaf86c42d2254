"""One token space for every modality: named half-open id ranges [start, end) inside the vocabulary."""

import torch
from torch import Tensor

from soma_lightning.errors import UserError


def check_ranges(ranges: dict[str, list[int]], vocab_size: int, path: str) -> None:
    """Ranges are [start, end) pairs of ints inside [0, vocab_size), disjoint; raises ValueError naming the key."""
    spans = []
    for name, span in ranges.items():
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(v, int) for v in span)):
            raise ValueError(f"{path}.{name}: expected [start, end) as two ints, got {span!r}")
        start, end = span
        if not 0 <= start < end <= vocab_size:
            raise ValueError(f"{path}.{name}: [{start}, {end}) must satisfy 0 <= start < end <= vocab_size ({vocab_size})")
        spans.append((start, end, name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{path}.{b}: overlaps {a}")


def check_token_ids(tokens: Tensor, vocab_size: int, ranges: dict[str, list[int]] | None, where: str) -> None:
    """A UserError naming the first id outside the vocabulary or outside every declared range."""
    bad = (tokens < 0) | (tokens >= vocab_size)
    if ranges:
        inside = torch.zeros_like(bad)
        for start, end in ranges.values():
            inside |= (tokens >= start) & (tokens < end)
        bad |= ~inside
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        declared = ", ".join(f"{n} [{s}, {e})" for n, (s, e) in ranges.items()) if ranges else f"[0, {vocab_size})"
        raise UserError(f"{where}: token id {int(tokens[index])} at index {list(index)} is outside the token space: {declared}")


def modality_of(tokens: Tensor, ranges: dict[str, list[int]]) -> Tensor:
    """The index (in declaration order) of the range each id falls in."""
    out = torch.zeros_like(tokens)
    for i, (start, end) in enumerate(ranges.values()):
        out = torch.where((tokens >= start) & (tokens < end), i, out)
    return out
