"""The learned part of differential attention (ops/attention/differential.py), shared by the `mha`, `gqa` and
`graph_attention` mixers' option `differential: true`: the weight lambda of the second map, and the per-head
RMSNorm of the output scaled by (1 - lambda_init)."""

import math
from typing import Callable

import torch
from torch import Tensor, nn

from soma_lightning.nn.decode import DecodeState, cached_attention
from soma_lightning.nn.ops.attention.differential import differential_attention, differential_attention_reference
from soma_lightning.nn.protocols import ComponentArgumentError


def lambda_init_schedule(layer: int) -> float:
    """The paper's lambda_init of layer `layer` (1-based): 0.8 - 0.6 exp(-0.3 (layer - 1))."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


def check_differential_head_dim(head_dim: int) -> None:
    if head_dim % 4:
        raise ComponentArgumentError("differential", f"needs a head dim divisible by 4 (two rotated halves), got {head_dim}")


class Differential(nn.Module):
    """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, one scalar per layer (the vectors, of hd/2 each,
    drawn from N(0, 0.1)); the heads' output y [B, H, T, hd] leaves as RMSNorm_hd(y) * (1 - lambda_init)."""

    def __init__(self, head_dim: int, lambda_init: float) -> None:
        super().__init__()
        check_differential_head_dim(head_dim)
        if not 0.0 <= lambda_init < 1.0:
            raise ComponentArgumentError("lambda_init", f"must be in [0, 1), got {lambda_init}")
        self.lambda_init = lambda_init
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (nn.Parameter(torch.randn(head_dim // 2) * 0.1) for _ in range(4))
        self.norm = nn.RMSNorm(head_dim, eps=1e-5)

    def lam(self) -> Tensor:
        """The scalar lambda, float32."""
        first = torch.exp((self.lambda_q1.float() * self.lambda_k1.float()).sum())
        second = torch.exp((self.lambda_q2.float() * self.lambda_k2.float()).sum())
        return first - second + self.lambda_init

    def output(self, y: Tensor) -> Tensor:
        return self.norm(y) * (1 - self.lambda_init)

    def forward(self, attend: Callable[[Tensor, Tensor], Tensor], q: Tensor, k: Tensor) -> Tensor:
        """The heads' output through `attend` once per map (differential_attention), normalised."""
        return self.output(differential_attention(attend, q, k, self.lam()))

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
        """The same from the two dense maps (differential_attention_reference)."""
        return self.output(differential_attention_reference(q, k, v, self.lam(), mask, bias, dropout_p))

    def combine(self, maps: list[Tensor]) -> Tensor:
        """Both maps' softmax weights -> the weights the heads applied, A1 - lambda A2 (traces)."""
        return maps[0] - self.lam().to(maps[0].dtype) * maps[1]


def cached_differential(
    state: DecodeState, module: nn.Module, differential: Differential, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None = None
) -> Tensor:
    """decode.cached_attention for a differential layer; with state.record_attention, state.attention[module]
    holds A1 - lambda A2."""
    maps = []

    def attend(qh: Tensor, kh: Tensor) -> Tensor:
        y = cached_attention(state, module, qh, kh, v, mask, bias)
        if state.record_attention:
            maps.append(state.attention[module])
        return y

    y = differential(attend, q, k)
    if maps:
        state.attention[module] = differential.combine(maps)
    return y
