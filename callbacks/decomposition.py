"""DecompositionMonitor: the DePass decomposition of a SOSM model's next-token logits during training."""

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from soma_lightning.callbacks.monitors import _EveryNSteps, append_jsonl, log_scalars
from soma_lightning.decomposition import decompose, edge_type_of
from soma_lightning.errors import UserError

DECOMPOSITION_FILE = "decomposition.jsonl"


class DecompositionMonitor(_EveryNSteps):
    """Every `every_n_steps` steps, after the optimizer step: the first `rows` rows of the training batch
    decomposed (soma_lightning/decomposition.py, the model briefly in eval mode, no gradient), the targets
    being the batch's next tokens. Logged, as means over those positions: `decomp/logit` (the centred target
    logit), `decomp/source_{label}` for each MU block, "temporal" and "bias" (they sum to decomp/logit), and
    `decomp/edge_{type}` for "embedding", each edge type (summed over the graph-attention layers) and "bias"
    (they sum to it too). Rank zero appends them, per route label too, to `<log_dir>/decomposition.jsonl`.
    A model with a component the decomposition does not cover gets a warning naming it, and nothing else."""

    def __init__(self, every_n_steps: int = 100, rows: int = 1) -> None:
        super().__init__(every_n_steps)
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise ValueError(f"rows: expected a positive integer, got {rows!r}")
        self.rows = rows
        self.enabled = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model, training = pl_module.model, pl_module.model.training
        probe = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
        model.eval()
        try:
            decompose(model, probe, probe)
        except UserError as e:
            self.enabled = False
            rank_zero_warn(f"DecompositionMonitor: records nothing: {e}")
        finally:
            model.train(training)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.step is None or not self.enabled:
            return
        model = pl_module.model
        tokens, targets = batch["tokens"][: self.rows], batch["targets"][: self.rows]
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                sources, routes = (decompose(model, tokens, targets, labeling) for labeling in ("sources", "routes"))
        finally:
            model.train(training)
        mean = lambda c: float(c.float().mean())  # noqa: E731
        metrics = {"decomp/logit": mean(sources.logits)}
        metrics |= {f"decomp/source_{label}": mean(c) for label, c in sources.totals().items()}
        by_type = routes.totals({label: edge_type_of(label) for label in routes.labels})
        metrics |= {f"decomp/edge_{label}": mean(c) for label, c in by_type.items()}
        log_scalars(trainer, metrics, self.step)
        log_dir = trainer.log_dir  # a broadcast: every rank must ask
        if trainer.is_global_zero and log_dir is not None:
            routes_mean = {label: mean(c) for label, c in routes.totals().items()}
            append_jsonl(Path(log_dir) / DECOMPOSITION_FILE, {"step": self.step, **metrics, "routes": routes_mean})
