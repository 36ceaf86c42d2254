"""FinalValidation: every fit ends with a validation, whatever val_check_interval says."""

import lightning as L


class FinalValidation(L.Callback):
    """Stops the fit on its last step through `trainer.should_stop`, which makes Lightning's training loop run
    validation before it stops (as it does for early stopping), so the last checkpoint is scored and
    `best-*.ckpt` exists even when max_steps is not a multiple of val_check_interval. A step that validates
    anyway is not validated twice."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
