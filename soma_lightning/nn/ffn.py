"""Position-wise feed-forward networks."""

import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.protocols import check_positive


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

    def flops_per_token(self, seq_len: int) -> float:
        return 2 * 2 * self.linear_inner.in_features * self.linear_inner.out_features

    def supports_static_decode(self) -> bool:
        return True
