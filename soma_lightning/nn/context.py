from dataclasses import dataclass

from torch import Tensor


@dataclass
class SequenceContext:
    """What every sublayer may read besides its input: per-token facts about the sequence."""

    positions: Tensor  # [B, T] integer positions (RoPE reads them)
