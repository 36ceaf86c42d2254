"""Analytic size and cost of a model: parameters and FLOPs per token, read off a (meta-device) model."""

from torch import nn

from soma_lightning.nn.model import Block, SomaModel
from soma_lightning.nn.protocols import flops_per_token, inactive_parameters, linear_flops, mtp_horizons


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active per token). Modules with routed parts report what a token does not use through
    `inactive_parameters()`; dense models have active == total."""
    total = sum(p.numel() for p in model.parameters())
    return total, total - inactive_parameters(model)


def block_flops_per_token(block: Block, seq_len: int) -> float:
    """A block's sublayers: each gives its own by `flops_per_token(seq_len)`, or its Linear layers count."""
    return sum(flops_per_token(block.get_submodule(name), seq_len) for _, name in block.order)


def forward_flops_per_token(model: SomaModel, seq_len: int) -> float:
    """Matrix FLOPs of one training forward pass per token at `seq_len`, MTP heads included (each horizon
    also runs the predictor)."""
    predictor = linear_flops(model.predictor)
    horizons = sum(mtp_horizons(m) for m in model.modules())
    total = predictor * (1 + horizons) + sum(block_flops_per_token(layer, seq_len) for layer in model.encoder.layers)
    if model.mtp is not None:
        for depth in model.mtp.depths:
            total += linear_flops(depth.combine) + block_flops_per_token(depth.block, seq_len) + predictor
    return total


def train_flops_per_token(model: SomaModel, seq_len: int) -> float:
    """Forward + backward: three times the forward matrix FLOPs."""
    return 3 * forward_flops_per_token(model, seq_len)
