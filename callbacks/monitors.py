"""Training monitors: MoE expert load, SOSM graph statistics, gradient and activation norms per block. Each does
its work only every `every_n_steps` optimizer steps (nothing is hooked or synchronised on the other steps), writes
its scalars straight to the loggers at that step, and writes files on global rank zero only."""

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from soma_lightning.nn.moe import MoE
from soma_lightning.nn.semantic_graph import EDGE_TYPES
from soma_lightning.nn.semantic_state import SemanticStateEmbedding
from soma_lightning.plots import expert_load_figure, save_figure

EXPERT_LOAD_FILE = "expert_load.jsonl"
GRAPH_STATS_FILE = "graph_stats.jsonl"


def _check_every(every_n_steps: int) -> int:
    if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
        raise ValueError(f"every_n_steps: expected a positive integer, got {every_n_steps!r}")
    return every_n_steps


def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Straight to every logger at `step`: `self.log` would only reach them on Lightning's own logging steps."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _tensorboard(trainer: L.Trainer):
    return next((logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)


class _EveryNSteps(L.Callback):
    """`self.step` is the optimizer step of the current batch when it is due, else None."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = _check_every(every_n_steps)
        self.step: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.step = trainer.global_step if trainer.global_step % self.every_n_steps == 0 else None


class ExpertLoadMonitor(_EveryNSteps):
    """Every `every_n_steps` steps: for each MoE layer, the tokens routed to each expert (summed over ranks) and the
    fraction of assignments dropped by the capacity limit. Logs `moe/max_load_{layer}` (busiest expert over the
    mean) and `moe/dropped_fraction_{layer}`, appends the counts to `<log_dir>/expert_load.jsonl` (read by
    `soma-lightning report`), and draws the load of every expert of every layer, relative to the mean, as a
    heatmap: `<log_dir>/expert_load/step=N.png`, and an image in TensorBoard when it is a logger. A model without
    MoE layers gets a warning and nothing else."""

    def __init__(self, every_n_steps: int = 100) -> None:
        super().__init__(every_n_steps)
        self.layers: list[tuple[str, MoE]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.layers = [(name, m) for name, m in pl_module.model.named_modules() if isinstance(m, MoE)]
        if not self.layers:
            rank_zero_warn("ExpertLoadMonitor: the model has no MoE layers (ffn type moe), so it records nothing")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.step is None or not self.layers:
            return
        counts = torch.stack([m.stats["tokens_per_expert"].float() for _, m in self.layers])
        dropped = torch.stack([m.stats["dropped_fraction"].float() for _, m in self.layers])
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        dropped = trainer.strategy.reduce(dropped, reduce_op="mean")
        counts, dropped = counts.tolist(), dropped.tolist()
        names = [name for name, _ in self.layers]
        max_load = [max(row) / (sum(row) / len(row)) for row in counts]
        log_scalars(trainer, {f"moe/max_load_{i}": v for i, v in enumerate(max_load)} | {f"moe/dropped_fraction_{i}": v for i, v in enumerate(dropped)}, self.step)
        log_dir = trainer.log_dir  # a broadcast: every rank must ask
        if not trainer.is_global_zero:
            return
        append_jsonl(Path(log_dir) / EXPERT_LOAD_FILE, {"step": self.step, "layers": names, "tokens_per_expert": counts, "dropped_fraction": dropped})
        figure = expert_load_figure(names, counts, dropped, self.step)
        writer = _tensorboard(trainer)
        if writer is not None:
            writer.add_figure("moe/expert_load", figure, global_step=self.step, close=False)
        save_figure(figure, Path(log_dir) / "expert_load" / f"step={self.step}.png")


class GraphMonitor(_EveryNSteps):
    """Every `every_n_steps` steps, statistics of the semantic graph a SOSM model built for the batch: edges per
    token of each type (`graph/edges_per_token_{type}`), the out-degree (edges a token attends over) and the
    in-degree (tokens that attend to a position) as histograms, `graph/in_degree_max`. Appended to
    `<log_dir>/graph_stats.jsonl`; the degrees also as TensorBoard histograms. The graph is read by a forward hook
    on the semantic-state embedding, registered for the due steps only. A model without a semantic_state token
    embedding gets a warning and nothing else."""

    def __init__(self, every_n_steps: int = 100) -> None:
        super().__init__(every_n_steps)
        self.embedding: SemanticStateEmbedding | None = None
        self._handle = None
        self._stats: dict[str, Tensor] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        embedding = pl_module.model.embedding
        self.embedding = embedding if isinstance(embedding, SemanticStateEmbedding) else None
        if self.embedding is None:
            rank_zero_warn(f"GraphMonitor: the model has no SOSM semantic graph (its token embedding is {type(embedding).__name__}, not semantic_state), so it records nothing")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.step is not None and self.embedding is not None and self._handle is None:
            self._handle = self.embedding.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        graph = args[1].semantic_graph
        valid = graph.neighbors >= 0
        b, t = valid.shape[:2]
        in_degree = torch.zeros(b, t, device=valid.device, dtype=torch.long)
        in_degree.scatter_add_(1, graph.neighbors.flatten(1).clamp(min=0), valid.flatten(1).long())  # empty slots add 0
        self._stats = {
            "by_type": torch.stack([(graph.edge_type == k).sum() for k in range(len(EDGE_TYPES))]),
            "out_degree": torch.bincount(valid.sum(-1).flatten(), minlength=valid.shape[-1] + 1),
            "in_degree": torch.bincount(in_degree.flatten(), minlength=t + 1),
            "tokens": torch.tensor(b * t, device=valid.device),
        }

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.step is None or self._stats is None:
            return
        stats = {k: trainer.strategy.reduce(v, reduce_op="sum").tolist() for k, v in self._stats.items()}
        self._stats = None
        per_token = {kind: n / stats["tokens"] for kind, n in zip(EDGE_TYPES, stats["by_type"])}
        in_degree_max = max(d for d, n in enumerate(stats["in_degree"]) if n)
        log_scalars(trainer, {f"graph/edges_per_token_{k}": v for k, v in per_token.items()} | {"graph/in_degree_max": in_degree_max}, self.step)
        log_dir = trainer.log_dir  # a broadcast: every rank must ask
        if not trainer.is_global_zero:
            return
        append_jsonl(Path(log_dir) / GRAPH_STATS_FILE, {
            "step": self.step, "edges_per_token": per_token, "out_degree_hist": stats["out_degree"], "in_degree_hist": stats["in_degree"],
        })
        writer = _tensorboard(trainer)
        if writer is not None:
            for name in ("out_degree", "in_degree"):
                counts = stats[name]
                degrees = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
                writer.add_histogram(f"graph/{name}", degrees, global_step=self.step)


def _local(grad: Tensor) -> Tensor:
    return grad.to_local() if isinstance(grad, DTensor) else grad


class BlockNormMonitor(_EveryNSteps):
    """Every `every_n_steps` steps, for each block i of `model.encoder.layers`: `blocks/activation_norm_{i}`, the
    mean over tokens of the L2 norm of the block's output (forward hooks registered for the due steps only,
    averaged over ranks), and `blocks/grad_norm_{i}`, the L2 norm of the block's parameter gradients after
    backward and AMP unscaling, before clipping (under FSDP the shards' squared norms are summed across ranks;
    under DDP the gradients are already reduced). With gradient accumulation the activations are the last
    micro-batch's."""

    def __init__(self, every_n_steps: int = 100) -> None:
        super().__init__(every_n_steps)
        self._handles: list = []
        self._activations: dict[int, Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.step is not None and not self._handles:
            self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(pl_module.model.encoder.layers)]

    def _hook(self, i: int):
        def record(module: nn.Module, args: tuple, output: tuple[Tensor, list]) -> None:
            self._activations[i] = output[0].detach().float().norm(dim=-1).mean()
        return record

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.step is None:
            return
        layers = pl_module.model.encoder.layers
        squares = []
        for layer in layers:
            grads = [_local(p.grad) for p in layer.parameters() if p.grad is not None]
            squares.append(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum() if grads else torch.zeros((), device=pl_module.device))
        squares = torch.stack(squares)
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            squares = trainer.strategy.reduce(squares, reduce_op="sum")
        metrics = {f"blocks/grad_norm_{i}": v for i, v in enumerate(squares.sqrt().tolist())}
        if self._activations:
            activations = trainer.strategy.reduce(torch.stack([self._activations[i] for i in range(len(layers))]), reduce_op="mean")
            metrics |= {f"blocks/activation_norm_{i}": v for i, v in enumerate(activations.tolist())}
        self._activations = {}
        log_scalars(trainer, metrics, self.step)
