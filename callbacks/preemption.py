"""PreemptionCheckpoint: a SIGTERM (preemption, `scancel`, `kill`) ends the run with a resumable last.ckpt."""

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class PreemptionCheckpoint(L.Callback):
    """Lightning answers SIGTERM by finishing the current batch and raising SIGTERMException on every rank;
    this saves `last.ckpt` (atomically, through the Trainer's checkpoint IO) at that point, in the
    ModelCheckpoint's folder, so that `--ckpt_path last` continues exactly there. The process then exits
    with status 0. Other exceptions save nothing: a step that failed midway is not a state to resume from."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.global_step == 0:
            return
        folder = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
        path = Path(folder or Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"
        trainer.save_checkpoint(path)
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
