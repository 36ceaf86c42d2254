"""Position-wise feed-forward networks."""

import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.protocols import ComponentArgumentError, check_positive


class GeluMLP(nn.Module):
    """Linear(D, hidden) -> exact (erf) GELU -> dropout -> Linear(hidden, D): SOMA V1's `pwff`."""

    default_name = "pwff"

    def __init__(self, d_model: int, hidden_dim: int, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        check_positive(hidden_dim=hidden_dim)
        self.linear_inner = nn.Linear(d_model, hidden_dim, bias=bias)
        self.linear_outer = nn.Linear(hidden_dim, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, ctx: SequenceContext) -> Tensor:
        return self.linear_outer(self.drop(F.gelu(self.linear_inner(x))))

    def supports_static_decode(self) -> bool:
        return True

    def tensor_parallel_plan(self, tp: int) -> dict[str, ParallelStyle]:
        """The hidden units split over the ranks: the inner layer column-wise, the outer row-wise."""
        if self.linear_inner.out_features % tp:
            raise ComponentArgumentError("hidden_dim", f"{self.linear_inner.out_features} does not split over tp={tp} tensor-parallel ranks")
        return {"linear_inner": ColwiseParallel(), "linear_outer": RowwiseParallel()}
