"""K1Attribution: hierarchical credit assignment of the gradient over the model's module tree, logged and
optionally used to scale the gradients before the optimizer step."""

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from soma_lightning.callbacks.monitors import append_jsonl, log_scalars
from soma_lightning.nn.model import Encoder

# Wrapper modules (FSDP1, activation checkpointing, torch.compile) stand for the module they wrap.
_WRAPPERS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
# Containers above the blocks are transparent: their children are the blocks (encoder.layers.i, input_embeddings.j).
_CONTAINERS = (Encoder, nn.ModuleList, nn.ModuleDict)


class _Tree:
    """The node tree over a model's parameters: node 0 is the model, every parameter is a leaf node."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params: list[nn.Parameter] = []
        self.names: list[str] = [""]
        self.children: list[list[int]] = [[]]
        # Per parameter: the node ids from the root down to its own leaf.
        self.lineage: list[list[int]] = []
        ids = {"": 0}
        for name, p in model.named_parameters():
            parts = name.split(".")
            lineage, above_blocks = [0], True
            for i in range(1, len(parts) + 1):
                if parts[i - 1] in _WRAPPERS:
                    continue
                if i < len(parts) and above_blocks and isinstance(model.get_submodule(".".join(parts[:i])), _CONTAINERS):
                    continue
                above_blocks = False
                node = ".".join(part for part in parts[:i] if part not in _WRAPPERS)
                if node not in ids:
                    ids[node] = len(self.names)
                    self.names.append(node)
                    self.children.append([])
                    self.children[lineage[-1]].append(ids[node])
                lineage.append(ids[node])
            self.params.append(p)
            self.lineage.append(lineage)
        pairs = [(node, i) for i, lineage in enumerate(self.lineage) for node in lineage]
        self._pairs = torch.tensor(pairs).T

    def squared_scores(self, device: torch.device) -> Tensor:
        """Every node's squared gradient norm over this rank's gradients (or local shards), on device."""
        grads = [p.grad for p in self.params]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads if g is not None]
        norms = iter(torch._foreach_norm(local, 2, dtype=torch.float32)) if local else iter(())
        zero = torch.zeros((), device=device)
        param_sq = torch.stack([zero if g is None else next(norms) for g in grads]).square()
        if self._pairs.device != device:
            self._pairs = self._pairs.to(device)
        nodes, params = self._pairs
        return torch.zeros(len(self.names), device=device).index_add_(0, nodes, param_sq[params])

    def path(self, scores: list[float]) -> list[int]:
        """From the root, the child with the largest score until a leaf parameter (the culprit)."""
        path = [0]
        while self.children[path[-1]]:
            path.append(max(self.children[path[-1]], key=scores.__getitem__))
        return path


class K1Attribution(L.Callback):
    """K-1 attribution. The tree: `pl_module.model` is the root (named ""); its children are the blocks, i.e.
    every `encoder.layers.i` and every other top-level child with parameters (embedding, input_embeddings.j,
    final_norm, predictor, mtp); below that a module's children are its child modules with parameters plus its
    own parameters, which are the leaves. Nodes are named by qualified name relative to the model.

    A node's score is the L2 norm of the gradients in its subtree: one `_foreach_norm` over all gradients, squared
    and summed up the tree on device, one host transfer. Under FSDP / ModelParallel the gradients are shards, so
    the squared norms are summed across ranks first; under DDP they are already all-reduced in this hook. The path
    goes from the root to the child with the largest score until a parameter, the culprit; a node's share is its
    squared score over its parent's. Every `every_n_steps` steps the shares are logged as `k1/share_depth_{d}`
    (d >= 1) with `k1/culprit_grad_norm`, and the path is appended as one JSON line to
    `<log_dir>/k1_attribution.jsonl` (rank zero) and kept in `last_path` as (name, share) pairs, root first.

    `mode="analyze"` only does that, and only on those steps. `mode="update"` attributes every step and scales
    every gradient by the factor of its nearest ancestor-or-self on the path: the culprit by `culprit`, the rest
    of the culprit's owning module (the parent) by `parent`, the rest of the culprit's block (including the path
    nodes between block and parent) by `root`, everything else by `off_path`. "Root" means the block rather than
    the model, because the model holds every parameter and "off the path" would then be empty.

    Lightning 2.6 calls `on_before_optimizer_step` after backward and AMP unscaling but before gradient clipping
    (`Precision._after_closure`), so the scaling acts on true gradients and clipping sees the scaled ones."""

    def __init__(
        self, mode: Literal["analyze", "update"] = "analyze", every_n_steps: int = 50,
        culprit: float = 1.0, parent: float = 0.15, root: float = 0.05, off_path: float = 0.0,
    ) -> None:
        if mode not in ("analyze", "update"):
            raise ValueError(f"mode: expected 'analyze' or 'update', got {mode!r}")
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected a positive integer, got {every_n_steps!r}")
        for name, factor in (("culprit", culprit), ("parent", parent), ("root", root), ("off_path", off_path)):
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor) or factor < 0:
                raise ValueError(f"{name}: expected a finite non-negative number, got {factor!r}")
        self.mode = mode
        self.every_n_steps = every_n_steps
        self.culprit, self.parent, self.root, self.off_path = float(culprit), float(parent), float(root), float(off_path)
        self.last_path: list[tuple[str, float]] | None = None
        self.culprit_grad_norm: float | None = None
        self._tree: _Tree | None = None
        self._path: list[int] = []

    def attribute(self, model: nn.Module, reduce: Callable[[Tensor], Tensor] | None = None) -> list[tuple[str, float]]:
        """The path from the root to the culprit as (name, share) pairs, also kept in `last_path`. `reduce` sums
        the squared scores across ranks, for sharded gradients."""
        if self._tree is None or self._tree.model is not model:
            self._tree = _Tree(model)
        squared = self._tree.squared_scores(next(model.parameters()).device)
        scores = (squared if reduce is None else reduce(squared)).tolist()
        self._path = self._tree.path(scores)
        shares = [scores[node] / scores[up] if scores[up] > 0 else 0.0 for up, node in zip(self._path, self._path[1:])]
        self.last_path = list(zip((self._tree.names[node] for node in self._path), [1.0, *shares]))
        self.culprit_grad_norm = math.sqrt(scores[self._path[-1]])
        return self.last_path

    def scale(self) -> None:
        """Scales every gradient by the factor of its nearest ancestor-or-self on the last attributed path."""
        assert self._tree is not None, "attribute() first"
        depth = {node: d for d, node in enumerate(self._path)}
        by_depth = {len(self._path) - 1: self.culprit, len(self._path) - 2: self.parent}
        grads, factors = [], []
        for p, lineage in zip(self._tree.params, self._tree.lineage):
            if p.grad is None:
                continue
            d = next(depth[node] for node in reversed(lineage) if node in depth)
            grads.append(p.grad)
            factors.append(self.off_path if d == 0 else by_depth.get(d, self.root))
        if grads:
            torch._foreach_mul_(grads, factors)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        due = trainer.global_step % self.every_n_steps == 0
        if not due and self.mode == "analyze":
            return
        sharded = isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
        self.attribute(pl_module.model, partial(trainer.strategy.reduce, reduce_op="sum") if sharded else None)
        if due:
            self._log(trainer, pl_module)
        if self.mode == "update":
            self.scale()

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.last_path is not None
        log_dir = trainer.log_dir  # a broadcast: every rank must ask
        if not trainer.is_global_zero:
            return
        metrics = {f"k1/share_depth_{d}": share for d, (_, share) in enumerate(self.last_path[1:], start=1)}
        log_scalars(trainer, metrics | {"k1/culprit_grad_norm": self.culprit_grad_norm}, trainer.global_step)
        if log_dir is not None:
            record = {"step": trainer.global_step, "path": [{"node": name, "share": share} for name, share in self.last_path]}
            append_jsonl(Path(log_dir) / "k1_attribution.jsonl", record)
