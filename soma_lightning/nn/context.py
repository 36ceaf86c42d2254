from dataclasses import dataclass, field

from torch import Tensor

from soma_lightning.nn.decode import DecodeState


@dataclass
class SequenceContext:
    """What every sublayer may read besides its input: per-token facts about the sequence."""

    positions: Tensor  # [B, T] integer positions (RoPE reads them)
    doc_ids: Tensor | None = None  # [B, T] document index within a packed window; attention stays inside one
    structure: Tensor | None = None  # [B, T, L] enclosing-span starts per position (data_modules/structure.py)
    cache: dict = field(default_factory=dict)  # built once per forward, shared by layers (e.g. attention masks)
    mtp: list | None = None  # where MTP heads put their predictions (training); None skips the heads
    decode: DecodeState | None = None  # incremental decoding: the tokens are the newest of the sequence it holds
