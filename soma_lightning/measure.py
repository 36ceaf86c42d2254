"""Analytic size and cost of a model: parameters and FLOPs per token, read off a (meta-device) model."""

from torch import nn

from soma_lightning.nn.model import Block, SomaModel
from soma_lightning.nn.mtp import MTPHeads


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active per token). Modules with routed parts report what a token does not use through
    `inactive_parameters()`; dense models have active == total."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(m.inactive_parameters() for m in model.modules() if hasattr(m, "inactive_parameters"))
    return total, total - inactive


def linear_flops(module: nn.Module) -> float:
    """Forward FLOPs per token of the Linear layers inside `module`: 2 per weight."""
    return sum(2.0 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def block_flops_per_token(block: Block, seq_len: int) -> float:
    """A block's sublayers: each gives its own by `flops_per_token(seq_len)`, or its Linear layers count."""
    return sum(
        sub.flops_per_token(seq_len) if hasattr(sub, "flops_per_token") else linear_flops(sub)
        for sub in (block.get_submodule(name) for _, name in block.order)
    )


def forward_flops_per_token(model: SomaModel, seq_len: int) -> float:
    """Matrix FLOPs of one training forward pass per token at `seq_len`, MTP heads included (each horizon
    also runs the predictor)."""
    predictor = linear_flops(model.predictor)
    horizons = sum(len(m.heads) for m in model.modules() if isinstance(m, MTPHeads))
    total = predictor * (1 + horizons) + sum(block_flops_per_token(layer, seq_len) for layer in model.encoder.layers)
    if model.mtp is not None:
        for depth in model.mtp.depths:
            total += linear_flops(depth.combine) + block_flops_per_token(depth.block, seq_len) + predictor
    return total


def train_flops_per_token(model: SomaModel, seq_len: int) -> float:
    """Forward + backward: three times the forward matrix FLOPs."""
    return 3 * forward_flops_per_token(model, seq_len)
