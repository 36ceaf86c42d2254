"""PredictionWriter: what `soma-lightning predict` computes, written to a file."""

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from soma_lightning.checkpoint_io import atomic_write


class PredictionWriter(BasePredictionWriter):
    """Writes one JSON line per predicted row (its index, NLL sum in nats, target tokens, nats per token) to
    `path` when prediction ends, and says where on stderr."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(write_interval="epoch")
        self.path = Path(path)

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions  # one dataloader
        pairs = [(nll, n) for batch in batches for nll, n in zip(batch["nll"].tolist(), batch["n_tokens"].tolist())]
        rows = [{"row": i, "nll": nll, "n_tokens": n, "nll_per_token": nll / n if n else None} for i, (nll, n) in enumerate(pairs)]
        # Under data parallelism each rank predicts its own share of the rows.
        path = self.path if trainer.world_size == 1 else self.path.with_suffix(f".rank{trainer.global_rank}{self.path.suffix}")

        def write(tmp: Path) -> None:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))

        atomic_write(path, write)
        print(f"soma-lightning: predict: {len(rows)} rows written to {path}", file=sys.stderr)
