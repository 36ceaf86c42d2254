"""Analytic size and cost of a model: parameters and FLOPs per token, read off a (meta-device) model."""

from torch import nn

from soma_lightning.nn.model import SomaModel


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active per token). Modules with routed parts report what a token does not use through
    `inactive_parameters()`; dense models have active == total."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(m.inactive_parameters() for m in model.modules() if hasattr(m, "inactive_parameters"))
    return total, total - inactive


def linear_flops(module: nn.Module) -> float:
    """Forward FLOPs per token of the Linear layers inside `module`: 2 per weight."""
    return sum(2.0 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def forward_flops_per_token(model: SomaModel, seq_len: int) -> float:
    """Matrix FLOPs of one forward pass per token at `seq_len`. Sublayers give theirs by
    `flops_per_token(seq_len)`; one without that method counts its Linear layers."""
    total = linear_flops(model.predictor)
    for layer in model.encoder.layers:
        for _, name in layer.order:
            sub = layer.get_submodule(name)
            total += sub.flops_per_token(seq_len) if hasattr(sub, "flops_per_token") else linear_flops(sub)
    return total


def train_flops_per_token(model: SomaModel, seq_len: int) -> float:
    """Forward + backward: three times the forward matrix FLOPs."""
    return 3 * forward_flops_per_token(model, seq_len)
