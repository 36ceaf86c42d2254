"""SomaLM: the one LightningModule. It builds its model from the spec and trains cross-entropy + SIGReg."""

import math
from dataclasses import asdict, dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torchmetrics import MeanMetric, Metric

from soma_lightning.distillation import DistillConfig, distillation_loss, load_teacher
from soma_lightning.float8 import require_torchao
from soma_lightning.nn.protocols import after_train_batch, auxiliary_terms
from soma_lightning.nn.sigreg import SIGRegConfig, sigreg_statistic
from soma_lightning.spec import ModelSpec, build_model, spec_from_dict
from soma_lightning.token_space import check_token_ids, modality_of
from soma_lightning.parallel.mesh import batch_replica
from soma_lightning.parallel.parallelize import clip_grad_norm_, parallelize, spans_meshes
from soma_lightning.onchain import ONCHAIN_SIGREG, arrgen_noise, onchain_batch_loss, target_nll
from soma_lightning.warm_start import load_initial_weights
from soma_lightning.vocabulary import BYTE_PAD, check_tokenizer_file, vocabulary

TOKENIZER_SHA256 = "tokenizer_sha256"  # the checkpoint key of the model's tokenizer file's SHA-256 (none for bytes)

Batch = dict[str, torch.Tensor]


def _grad_scaler(trainer: L.Trainer) -> torch.amp.GradScaler | None:
    """fp16 mixed precision's loss scaler; None under every other precision."""
    return getattr(trainer.precision_plugin, "scaler", None)


class RangeCE(Metric):
    """Summed NLL and target count per vocabulary range (model.arch.vocab_ranges), by each target's range;
    targets that are `pad` are left out."""

    def __init__(self, ranges: dict[str, list[int]], pad: int = BYTE_PAD) -> None:
        super().__init__()
        self.ranges, self.pad = ranges, pad
        self.add_state("nll", torch.zeros(len(ranges), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(len(ranges), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor, targets: torch.Tensor) -> None:
        keep = targets != self.pad
        which = modality_of(targets[keep], self.ranges)
        self.nll.index_add_(0, which, nll[keep].double())
        self.count.index_add_(0, which, torch.ones_like(which, dtype=torch.float64))

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean NLL (nats) per range that received targets."""
        return {name: self.nll[i] / self.count[i] for i, name in enumerate(self.ranges) if self.count[i] > 0}


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
    """A SOMA-family language model and its objective: CE over non-PAD targets + sigreg.coefficient *
    SIGReg on the final representations, plus the MTP heads' weighted CE and the components' auxiliary
    losses (nn/protocols.py). PAD and EOS are those of the spec's tokenizer (`self.vocabulary`); the CE in bits
    is logged as bits_per_byte for a byte model and bits_per_token for a tokenizer's.

    Every micro-batch reseeds torch's generators from (noise_seed, step, micro-batch, rank), so dropout
    masks are a function of the data position and a resumed run draws the same ones. Activation
    checkpointing, compile and float8 are applied in `configure_model` by `parallelize` (parallel/parallelize.py),
    together with the parallelism of FSDP2Strategy's device mesh (tensor, expert and context parallel, then
    FSDP2: one `fully_shard` unit per block, then the root), so they work the same under every strategy.

    Args:
        arch: the model spec (the `arch` mapping of a spec file).
        sigreg: the SIGReg term of the objective.
        optim: AdamW and its learning-rate schedule.
        noise_seed: training noise for step s is N(0, 1) from torch's generator seeded with noise_seed + s;
            validation noise for batch b is the canonical scorer's (soma-arrgen, noise_seed + b), so that
            val/onchain_loss is the loss `soma-lightning score` reports for the val split (one device,
            val_seq_len 1024, val_batch_size 16).
        init_weights: a safetensors file to start from (soma_lightning/warm_start.py): an export of any spec
            (`soma-lightning export`, state_dict layout) or SOMA V1's canonical file; checkpoints are refused.
        init_weights_strict: every tensor of the model must be in init_weights with its shape, and nothing
            else (a one-line error names what differs); false loads the tensors whose name and shape match,
            keeps the rest as initialised and warns, in one line, what was not loaded (to grow a model).
        activation_checkpointing: recompute each block in backward instead of keeping its activations.
        compile: torch.compile each block.
        float8: the blocks' Linear layers compute in float8 through torchao (soma_lightning/float8.py;
            needs the float8 extra).
        distill: distillation from a teacher model (soma_lightning/distillation.py): the training loss adds
            weight x KL on the teacher's softened logits; validation stays the student's own CE. The teacher
            is loaded when a fit starts, not here, so loading a distilled student needs no teacher.
    """

    def __init__(
        self,
        arch: ModelSpec,
        sigreg: SIGRegConfig = SIGRegConfig(),
        optim: OptimConfig = OptimConfig(),
        noise_seed: int = 0,
        init_weights: str | None = None,
        init_weights_strict: bool = True,
        activation_checkpointing: bool = False,
        compile: bool = False,
        float8: bool = False,
        distill: DistillConfig | None = None,
    ) -> None:
        super().__init__()
        if isinstance(arch, dict):  # hyper-parameters read back from a checkpoint
            arch, sigreg, optim = spec_from_dict(arch), SIGRegConfig(**sigreg), OptimConfig(**optim)
        if isinstance(distill, dict):
            distill = DistillConfig(**distill)
        # logger=False: the CLI logs the whole resolved config as the hyper-parameters instead (cli.LogConfigCallback)
        self.save_hyperparameters({
            "arch": asdict(arch), "sigreg": asdict(sigreg), "optim": asdict(optim), "noise_seed": noise_seed, "init_weights": init_weights,
            "init_weights_strict": init_weights_strict,
            "activation_checkpointing": activation_checkpointing, "compile": compile, "float8": float8,
            "distill": asdict(distill) if distill is not None else None,
        }, logger=False)
        self.arch, self.sigreg, self.optim, self.noise_seed = arch, sigreg, optim, noise_seed
        self.activation_checkpointing, self.compile_blocks, self.float8 = activation_checkpointing, compile, float8
        # A tuple, not an attribute nn.Module registers: the teacher stays out of the state dict, the optimizer,
        # checkpoints and sharding. Filled in on_fit_start.
        self.distill, self._teacher = distill, ()
        if float8:
            require_torchao()
        self.model = build_model(arch)
        self.vocabulary = vocabulary(arch.tokenizer, arch.eos_token)
        self.bits_metric = "bits_per_byte" if self.vocabulary.is_bytes else "bits_per_token"
        if init_weights is not None:
            load_initial_weights(self.model, init_weights, init_weights_strict)
        self.val_ce, self.val_sigreg, self.val_onchain = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_range_ce = RangeCE(arch.vocab_ranges, self.vocabulary.pad) if arch.vocab_ranges else None

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(tokens, positions)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the tokenizer file's SHA-256: the spec names only where the file was."""
        if not self.vocabulary.is_bytes:
            checkpoint[TOKENIZER_SHA256] = self.vocabulary.sha256

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to resume or evaluate a checkpoint with another tokenizer file than the one it was trained with."""
        check_tokenizer_file(self.vocabulary.tokenizer, checkpoint.get(TOKENIZER_SHA256), "the checkpoint", "--model.arch.tokenizer")

    def configure_model(self) -> None:
        """float8, the strategy's parallelism (its device mesh), activation checkpointing, compile and FSDP2,
        all in `parallelize` (parallel/parallelize.py). Lightning may call this more than once."""
        if getattr(self, "_configured", False):
            return
        self._configured = True
        parallelize(
            self.model, self.device_mesh, self.arch, float8=self.float8, activation_checkpointing=self.activation_checkpointing,
            compile=self.compile_blocks,
        )

    def on_fit_start(self) -> None:
        """The distillation teacher, on this module's device (placed by the strategy by now)."""
        if self.distill is not None:
            self._teacher = (load_teacher(self.distill, self.vocabulary, self.arch.vocab_size, self.device),)

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        micro = batch_idx % self.trainer.accumulate_grad_batches
        # By the rank's batch, not its global rank: tensor-parallel ranks read one batch and must drop alike.
        batch_rank, _ = batch_replica(self.trainer.strategy, self.global_rank, self.trainer.world_size)
        seed = np.random.SeedSequence([self.noise_seed, self.global_step, micro, batch_rank]).generate_state(1)[0]
        torch.manual_seed(int(seed))
        # Loggers number steps by this counter, which Lightning restores one off after some resumes (a run
        # ended by `trainer.should_stop`); with one optimizer it is the global step by definition.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.global_step

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Refuse ids outside the vocabulary or the declared token space here, with the id and its place,
        instead of an index error deep inside the embedding."""
        check_token_ids(batch["tokens"], self.arch.vocab_size, self.arch.vocab_ranges, "batch tokens")
        return batch

    @staticmethod
    def _inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
        """What the model reads of a batch: tokens, positions and the per-token annotations it carries."""
        return batch["tokens"], batch["positions"], batch.get("doc_ids"), batch.get("structure")

    def _ce(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=self.vocabulary.pad)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        reps, mtp = self.model.encode_with_mtp(*self._inputs(batch))
        logits = self.model.predict(reps)
        ce = self._ce(logits, batch["targets"])
        noise = torch.randn(self.arch.d_model, self.sigreg.slices, generator=torch.Generator().manual_seed(self.noise_seed + self.global_step))
        sig = sigreg_statistic(reps, self._to_device(noise), self.sigreg.t_max, self.sigreg.points, compiled=self.compile_blocks)
        loss = ce + self.sigreg.coefficient * sig
        metrics = {"train/ce": ce, "train/sigreg": sig}
        if self.distill is not None:
            with torch.no_grad():
                teacher_logits = self._teacher[0](*self._inputs(batch))
            kl = distillation_loss(logits, teacher_logits, batch["targets"], self.vocabulary.pad, self.distill.temperature)
            loss = loss + self.distill.weight * kl
            metrics["train/distill_kl"] = kl
        by_horizon: dict[int, list[torch.Tensor]] = {}
        for p in mtp:  # horizon k: the target of position t is token t+1+k, i.e. targets[:, t+k]
            mtp_ce = self._ce(self.model.predict(p.representations[:, : -p.horizon]), batch["targets"][:, p.horizon :])
            loss = loss + p.loss_weight * mtp_ce
            by_horizon.setdefault(p.horizon, []).append(mtp_ce)
        metrics |= {f"train/mtp_{k}_ce": torch.stack(v).mean() for k, v in by_horizon.items()}
        aux_losses, aux_metrics = auxiliary_terms(self.model)  # e.g. MoE balancing, SOSM's MU regularisers
        for value in aux_losses.values():
            loss = loss + value
        metrics |= {f"train/{name}": value for name, value in (aux_losses | aux_metrics).items()}
        self.log_dict(metrics, sync_dist=True)  # the mean over ranks: the global batch's value under data parallelism
        # Not prog_bar: Lightning would read them back from the device after every step (callbacks/progress_bar.py
        # shows them as last logged instead).
        self.log("train/loss", loss, sync_dist=True)
        self.log(f"train/{self.bits_metric}", ce / math.log(2), sync_dist=True)
        return loss

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the module's device. To a GPU through pinned memory, asynchronously: a copy from
        pageable memory makes the host wait for everything queued on the device."""
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t.to(self.device)

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        after_train_batch(self.model)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        reps = self.model.encode(*self._inputs(batch))
        nll = target_nll(self.model.predict(reps), batch["targets"], self.vocabulary.pad)
        n = (batch["targets"] != self.vocabulary.pad).sum()
        seed = self.noise_seed + batch_idx
        onchain_sig = sigreg_statistic(reps, arrgen_noise(seed, self.arch.d_model).to(self.device))
        sig = onchain_sig
        if self.sigreg != ONCHAIN_SIGREG:
            noise = arrgen_noise(seed, self.arch.d_model, self.sigreg.slices).to(self.device)
            sig = sigreg_statistic(reps, noise, self.sigreg.t_max, self.sigreg.points)
        self.val_ce.update(nll.sum() / n, n)
        self.val_sigreg.update(sig, len(nll))
        self.val_onchain.update(onchain_batch_loss(nll, onchain_sig))
        if self.val_range_ce is not None:
            self.val_range_ce.update(nll, batch["targets"])

    def _log_eval(self, stage: str) -> None:
        """Token-weighted CE over the whole split (in bits: CE / ln 2), row-weighted SIGReg, the on-chain
        loss (mean over batches of their on-chain losses) and, with vocab_ranges, the CE per range."""
        ce, sig = self.val_ce.compute(), self.val_sigreg.compute()
        self.log_dict({
            f"{stage}/ce": ce, f"{stage}/sigreg": sig, f"{stage}/loss": ce + self.sigreg.coefficient * sig,
            f"{stage}/onchain_loss": self.val_onchain.compute(),
        })
        self.log(f"{stage}/{self.bits_metric}", ce / math.log(2), prog_bar=stage == "val")
        if self.val_range_ce is not None:  # per declared range, by the target's id: ce_{name} (nats), bits_per_token_{name}
            for name, range_ce in self.val_range_ce.compute().items():
                self.log_dict({f"{stage}/ce_{name}": range_ce.float(), f"{stage}/bits_per_token_{name}": range_ce.float() / math.log(2)})
            self.val_range_ce.reset()
        for metric in (self.val_ce, self.val_sigreg, self.val_onchain):
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-row NLL sum (nats) over non-PAD targets and the number of such targets."""
        nll = target_nll(self.model.predict(self.model.encode(*self._inputs(batch))), batch["targets"], self.vocabulary.pad)
        return {"nll": nll.sum(dim=1), "n_tokens": (batch["targets"] != self.vocabulary.pad).sum(dim=1)}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None) -> None:
        """Lightning refuses to clip for a fused optimizer under any mixed precision, because with fp16 the fused
        step unscales the gradients itself, after clipping would have seen them scaled. bf16 has no scaler: the
        gradients are already true, so they are clipped as under full precision and AdamW stays fused. Under
        tensor or expert parallel the gradients lie on several device meshes, which parallelize.clip_grad_norm_
        clips by one norm."""
        plugin = self.trainer.precision_plugin
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm" and _grad_scaler(self.trainer) is None and spans_meshes(params):
            clip_grad_norm_(params, gradient_clip_val)  # tensor or expert parallel: gradients on several meshes
        elif isinstance(plugin, MixedPrecision) and _grad_scaler(self.trainer) is None:
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val or 0.0, gradient_clip_algorithm or "norm")
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        o = self.optim
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.ndim >= 2 and not name.startswith("embedding") else no_decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=o.betas, eps=o.eps,
            # fp16's GradScaler cannot unscale before clipping when the fused step unscales itself (configure_gradient_clipping).
            fused=self.device.type == "cuda" and not (self.trainer.gradient_clip_val and _grad_scaler(self.trainer) is not None),
        )
        total = max(self.trainer.max_steps, 1) if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
