"""ProgressBar: Lightning's progress bar, with a total and an honest rate on a resumed run too, and the training
loss shown without reading it back from the GPU every step."""

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


class ProgressBar(TQDMProgressBar):
    """Lightning gives the bar its total and description in on_train_epoch_start, which it skips when a run
    resumes in the middle of an epoch (every max_steps run on an endless stream does): the resumed bar had
    no total and no ETA, and its rate counted the restored steps as if this process had run them. Here the
    bar starts at the restored step and its rate counts from there.

    The training metrics in SHOWN are taken from the values last written to the loggers (every
    log_every_n_steps). Logged with `prog_bar=True` instead, Lightning would convert them to Python numbers
    after every batch, a host-device synchronisation per step that leaves the GPU idle while the host waits."""

    SHOWN = ("train/loss", "train/bits_per_byte", "train/bits_per_token")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        bar = self.train_progress_bar
        remaining = convert_inf(self.total_train_batches)  # the bar counts batches from the epoch's start
        bar.reset(total=None if remaining is None else done + remaining)
        bar.initial = bar.n = done
        bar.set_description(f"Epoch {trainer.current_epoch}")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        for key in self.SHOWN:
            if key in trainer.logged_metrics:
                metrics[key] = float(trainer.logged_metrics[key])
        return metrics
