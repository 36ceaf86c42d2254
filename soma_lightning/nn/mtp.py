"""Multi-token prediction (MTP): extra heads trained to predict tokens beyond the next one.

Horizon k means the token k places after the next: at position t, token t+1+k. Both kinds return one
`MTPPrediction` per horizon, whose representations go through the model's shared predictor. They add nothing
to the residual stream, so the main head alone defines the model's likelihood; at inference they are skipped.

- `MTPHeads`: parallel heads placed as a sublayer anywhere in a block (`{norm: rmsnorm, mtp: {...}}`): head k
  projects the normalised stream at that point, then its own RMSNorm.
- `SequentialMTP`: DeepSeek-V3-style modules after the last layer. Depth k joins depth k-1's hidden state at
  position t with the embedding of token t+k and runs one block, so each depth sees the tokens it is given
  (up to t+k) and predicts the one after them.
"""

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.protocols import ComponentArgumentError


class MTPPrediction(NamedTuple):
    horizon: int  # predicts token t + 1 + horizon at position t
    loss_weight: float
    representations: Tensor  # [B, T, D], ready for the predictor


class MTPHeads(nn.Module):
    """`horizons` parallel heads, each a d x d projection then RMSNorm; each horizon's CE is weighted by
    `loss_weight` in the training loss."""

    default_name = "mtp"

    def __init__(self, d_model: int, horizons: int = 4, loss_weight: float = 0.1, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if horizons < 1:
            raise ComponentArgumentError("horizons", f"must be at least 1, got {horizons}")
        if loss_weight < 0:
            raise ComponentArgumentError("loss_weight", f"must be non-negative, got {loss_weight}")
        self.loss_weight = loss_weight
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, d_model, bias=False), nn.RMSNorm(d_model, eps=norm_eps)) for _ in range(horizons)
        )

    @property
    def horizons(self) -> int:
        return len(self.heads)

    def forward(self, x: Tensor, ctx: SequenceContext) -> list[MTPPrediction]:
        return [MTPPrediction(k, self.loss_weight, head(x)) for k, head in enumerate(self.heads, start=1)]

    def supports_static_decode(self) -> bool:
        return True


class MTPDepth(nn.Module):
    def __init__(self, d_model: int, block: nn.Module, make_norm: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.hidden_norm, self.token_norm, self.out_norm = make_norm(), make_norm(), make_norm()
        self.combine = nn.Linear(2 * d_model, d_model, bias=False)
        self.block = block


class SequentialMTP(nn.Module):
    """One `MTPDepth` per horizon, each with its own block (built from a block of the spec)."""

    def __init__(self, d_model: int, blocks: list[nn.Module], make_norm: Callable[[], nn.Module], loss_weight: float) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.depths = nn.ModuleList(MTPDepth(d_model, block, make_norm) for block in blocks)

    def forward(self, hidden: Tensor, tokens: Tensor, embedding: nn.Embedding, ctx: SequenceContext) -> list[MTPPrediction]:
        """`hidden`: the last layer's output before the final norm [B, T, D]; `embedding`: the model's token
        embedding (shared). Positions whose token t+k lies past the window get a zero token embedding; they
        have no target at that horizon."""
        predictions = []
        for k, depth in enumerate(self.depths, start=1):
            ahead = F.pad(embedding(tokens[:, k:]), (0, 0, 0, min(k, tokens.shape[1])))
            hidden, _ = depth.block(depth.combine(torch.cat([depth.hidden_norm(hidden), depth.token_norm(ahead)], dim=-1)), ctx)
            predictions.append(MTPPrediction(k, self.loss_weight, depth.out_norm(hidden)))
        return predictions
