"""Evaluation: lm-evaluation-harness tasks on the model being trained, at validation time."""

from typing import Any

import lightning as L


class Evaluation(L.Callback):
    """After every `every_n_validations`-th validation of a fit (not the sanity check), runs `tasks` through the
    harness adapter of soma_lightning/evaluation.py (the `eval` extra) on the model being trained, and logs each
    metric as `eval/<task>/<metric>` beside val/*. Every rank runs the same requests, so that a sharded model's
    forward passes stay in step; rank 0 logs. `limit` caps the documents per task (a fraction if < 1).
    Task names are checked when the fit sets up, in one line naming the unknown one."""

    def __init__(
        self, tasks: list[str], include_path: str | None = None, limit: int | float | None = None, batch_size: int = 16,
        every_n_validations: int = 1,
    ) -> None:
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations: expected a positive integer, got {every_n_validations}")
        self.tasks, self.include_path, self.limit = tasks, include_path, limit
        self.batch_size, self.every_n_validations = batch_size, every_n_validations
        self.validations = 0
        self.manager: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.manager is None:
            from soma_lightning.evaluation import check_tasks, task_manager

            self.manager = task_manager(self.include_path)
            check_tasks(self.tasks, self.manager)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.manager is None:
            return
        self.validations += 1
        if self.validations % self.every_n_validations:
            return
        from soma_lightning.evaluation import evaluate, metric_rows

        results = evaluate(pl_module, self.tasks, limit=self.limit, batch_size=self.batch_size, manager=self.manager)
        for task, metric, value, _ in metric_rows(results):
            pl_module.log(f"eval/{task}/{metric}", value, rank_zero_only=True)

    def state_dict(self) -> dict[str, int]:
        return {"validations": self.validations}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.validations = state["validations"]
