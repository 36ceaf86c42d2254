"""ProgressBar: Lightning's progress bar, with a total and an honest rate on a resumed run too."""

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


class ProgressBar(TQDMProgressBar):
    """Lightning gives the bar its total and description in on_train_epoch_start, which it skips when a run
    resumes in the middle of an epoch (every max_steps run on an endless stream does): the resumed bar had
    no total and no ETA, and its rate counted the restored steps as if this process had run them. Here the
    bar starts at the restored step and its rate counts from there."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        bar = self.train_progress_bar
        remaining = convert_inf(self.total_train_batches)  # the bar counts batches from the epoch's start
        bar.reset(total=None if remaining is None else done + remaining)
        bar.initial = bar.n = done
        bar.set_description(f"Epoch {trainer.current_epoch}")
