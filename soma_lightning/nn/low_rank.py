"""Factorised Linear layers: W = up @ down of rank R, R * (in + out) weights instead of in * out, and the
spec key `low_rank: {rank: R, include: [glob, ...]}` that swaps the matching nn.Linear of a model for them
(spec.py applies it where the spec is assembled)."""

import fnmatch

from torch import Tensor, nn

from soma_lightning.nn.protocols import ComponentArgumentError


class LowRankLinear(nn.Module):
    """y = up(down(x)): down Linear(in, rank) without bias, up Linear(rank, out) with the bias. Both keep
    nn.Linear's default initialisation, so the product starts at about the scale of a full Linear's
    weights divided by sqrt(3 * rank) (and a spec's init_std draws both factors)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if rank <= 0:
            raise ComponentArgumentError("rank", f"must be positive, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


def low_rank_targets(model: nn.Module, include: list[str]) -> list[str]:
    """Names of the nn.Linear modules of `model` that match one of the glob patterns (fnmatch, on the full
    module name, e.g. `encoder.layers.*.attention.*`), in module order."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and any(fnmatch.fnmatchcase(name, p) for p in include)]


def apply_low_rank(model: nn.Module, rank: int, include: list[str]) -> list[str]:
    """Replace each Linear `low_rank_targets` names with a LowRankLinear of `rank` (same in/out features and
    bias), on the device of the weights being replaced; -> the names replaced."""
    names = low_rank_targets(model, include)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = LowRankLinear(old.in_features, old.out_features, rank, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
        setattr(parent, child, new)
    return names
