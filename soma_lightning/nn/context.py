from dataclasses import dataclass, field

from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from soma_lightning.nn.decode import DecodeState
from soma_lightning.nn.rope import rope_tables
from soma_lightning.nn.semantic_graph import AttentionGraph, SemanticGraph


@dataclass
class SequenceContext:
    """What every sublayer may read besides its input: per-token facts about the sequence, and values derived
    from them that the first layer needing one builds and the later layers of the same forward pass reuse."""

    positions: Tensor  # [B, T] integer positions (RoPE reads them)
    doc_ids: Tensor | None = None  # [B, T] document index within a packed window; attention stays inside one
    structure: Tensor | None = None  # [B, T, L] enclosing-span starts per position (data_modules/structure.py)
    semantic_graph: SemanticGraph | AttentionGraph | None = None  # SOSM: set by the semantic-state embedding, read by GraphAttention
    mtp: list | None = None  # where MTP heads put their predictions (training); None skips the heads
    decode: DecodeState | None = None  # incremental decoding: the tokens are the newest of the sequence it holds

    # Built once per forward pass, before the blocks run (protocols.PreparesContext) or else on first use:
    rope_tables: dict[tuple[int, float, float], tuple[Tensor, Tensor]] = field(default_factory=dict)  # by (head_dim, base, scale_factor)
    flex_block_masks: dict[tuple[int | None, int | None], BlockMask] = field(default_factory=dict)  # by (window, global_stride)
    structure_buckets: dict[tuple[int, int | None, int | None], Tensor] = field(default_factory=dict)  # by (buckets, window, global_stride)
    delta_resets: tuple[Tensor, Tensor] | None = None  # gated_deltanet.document_resets: document starts, sequence bounds
    semantic_graph_block_mask: BlockMask | None = None  # GraphAttention's flex path

    def rope(self, head_dim: int, base: float, scale_factor: float = 1.0) -> tuple[Tensor, Tensor]:
        """RoPE's cos and sin tables at these positions (rope.rope_tables), computed once per forward and
        shared by the layers: computing them inside every layer's fused rotation kernel cost a sixth of a
        1.2B V1 training step on an H100 (bench/compare.py --profile)."""
        key = (head_dim, base, scale_factor)
        if key not in self.rope_tables:
            self.rope_tables[key] = rope_tables(self.positions, head_dim, base, scale_factor)
        return self.rope_tables[key]
