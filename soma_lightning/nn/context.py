from dataclasses import dataclass, field

from torch import Tensor

from soma_lightning.nn.decode import DecodeState
from soma_lightning.nn.rope import rope_tables


@dataclass
class SequenceContext:
    """What every sublayer may read besides its input: per-token facts about the sequence."""

    positions: Tensor  # [B, T] integer positions (RoPE reads them)
    doc_ids: Tensor | None = None  # [B, T] document index within a packed window; attention stays inside one
    structure: Tensor | None = None  # [B, T, L] enclosing-span starts per position (data_modules/structure.py)
    cache: dict = field(default_factory=dict)  # built once per forward, shared by layers (e.g. attention masks)
    mtp: list | None = None  # where MTP heads put their predictions (training); None skips the heads
    decode: DecodeState | None = None  # incremental decoding: the tokens are the newest of the sequence it holds

    def rope(self, head_dim: int, base: float, scale_factor: float = 1.0) -> tuple[Tensor, Tensor]:
        """RoPE's cos and sin tables at these positions (rope.rope_tables), computed once per forward and
        shared by the layers: computing them inside every layer's fused rotation kernel cost a sixth of a
        1.2B V1 training step on an H100 (bench/compare.py --profile)."""
        key = ("rope", head_dim, base, scale_factor)
        if key not in self.cache:
            self.cache[key] = rope_tables(self.positions, head_dim, base, scale_factor)
        return self.cache[key]
