"""SomaLM: the one LightningModule. It builds its model from the spec and trains cross-entropy + SIGReg."""

import math
from dataclasses import asdict, dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from soma_lightning.data_modules.contract import PAD
from soma_lightning.nn.sigreg import SIGRegConfig, sigreg_statistic
from soma_lightning.spec import ModelSpec, build_model, spec_from_dict

Batch = dict[str, torch.Tensor]


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to lr * min_lr_ratio at trainer.max_steps. Weight decay
    applies to matrices only (not to biases, norms or the embedding)."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1


class SomaLM(L.LightningModule):
    """`arch` is the model spec; the objective is CE over non-PAD targets + sigreg.coefficient * SIGReg on the
    final representations. Training noise for step s is N(0,1) from a generator seeded with noise_seed + s;
    validation noise for batch b with noise_seed + b (so validation is deterministic)."""

    def __init__(self, arch: ModelSpec, sigreg: SIGRegConfig = SIGRegConfig(), optim: OptimConfig = OptimConfig(), noise_seed: int = 0) -> None:
        super().__init__()
        if isinstance(arch, dict):  # hyper-parameters read back from a checkpoint
            arch, sigreg, optim = spec_from_dict(arch), SIGRegConfig(**sigreg), OptimConfig(**optim)
        self.save_hyperparameters({"arch": asdict(arch), "sigreg": asdict(sigreg), "optim": asdict(optim), "noise_seed": noise_seed})
        self.arch, self.sigreg, self.optim, self.noise_seed = arch, sigreg, optim, noise_seed
        self.model = build_model(arch)
        self.val_ce, self.val_sigreg = MeanMetric(), MeanMetric()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(tokens, positions)

    def _noise(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.arch.d_model, self.sigreg.slices, generator=g).to(self.device)

    def _losses(self, batch: Batch, noise_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ce: mean NLL over non-PAD targets, raw sigreg, number of non-PAD targets)."""
        reps = self.model.encode(batch["tokens"], batch["positions"])
        logits = self.model.predict(reps)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=PAD)
        sig = sigreg_statistic(reps, self._noise(noise_seed), self.sigreg.t_max, self.sigreg.points)
        return ce, sig, (batch["targets"] != PAD).sum()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        ce, sig, _ = self._losses(batch, self.noise_seed + self.global_step)
        loss = ce + self.sigreg.coefficient * sig
        self.log_dict({"train/ce": ce, "train/sigreg": sig, "train/loss": loss})
        self.log("train/bits_per_byte", ce / math.log(2), prog_bar=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        ce, sig, n = self._losses(batch, self.noise_seed + batch_idx)
        self.val_ce.update(ce, n)
        self.val_sigreg.update(sig, len(batch["tokens"]))

    def on_validation_epoch_end(self) -> None:
        """Token-weighted CE over the whole split (bits/byte = CE / ln 2) and row-weighted SIGReg."""
        ce, sig = self.val_ce.compute(), self.val_sigreg.compute()
        self.log_dict({"val/ce": ce, "val/sigreg": sig, "val/loss": ce + self.sigreg.coefficient * sig})
        self.log("val/bits_per_byte", ce / math.log(2), prog_bar=True)
        self.val_ce.reset()
        self.val_sigreg.reset()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        ce, sig = self.val_ce.compute(), self.val_sigreg.compute()
        self.log_dict({"test/ce": ce, "test/sigreg": sig, "test/loss": ce + self.sigreg.coefficient * sig, "test/bits_per_byte": ce / math.log(2)})
        self.val_ce.reset()
        self.val_sigreg.reset()

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-row NLL sum (nats) over non-PAD targets and the number of such targets."""
        logits = self.model(batch["tokens"], batch["positions"])
        nll = F.cross_entropy(logits.transpose(1, 2).float(), batch["targets"], ignore_index=PAD, reduction="none")
        return {"nll": nll.sum(dim=1), "n_tokens": (batch["targets"] != PAD).sum(dim=1)}

    def configure_optimizers(self):
        o = self.optim
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.ndim >= 2 and not name.startswith("embedding") else no_decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=o.betas, eps=o.eps, fused=self.device.type == "cuda",
        )
        total = max(self.trainer.max_steps, 1) if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
