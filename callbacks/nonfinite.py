"""NonFiniteGuard: catches a non-finite loss or gradient before the optimizer applies it, names where it arose,
then skips the step or stops after a checkpoint."""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _float_tensors(output: Any) -> Iterator[Tensor]:
    """The floating-point tensors in a module's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(output, Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _float_tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _float_tensors(item)


@contextmanager
def _muted_logging(pl_module: L.LightningModule) -> Iterator[None]:
    """A replayed training_step must not log its metrics a second time: shadow `log` and `log_dict`."""
    pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


class NonFiniteGuard(L.Callback):
    """Every `check_every_n_steps` optimizer steps, checks the loss and the gradients in one fused test (one host
    sync) in `on_before_optimizer_step`: after backward and AMP unscaling, before gradient clipping and the
    optimizer step. When something is non-finite it replays the step's training_step under forward hooks to name
    the first module of `pl_module.model` whose output is non-finite, lists the parameters whose gradients are
    (nearest the loss first), logs that as one line and keeps it in `last_report`, then drops the step: every
    gradient is set to None, so AdamW leaves the parameters and its own state as they were (the global step and
    the LR schedule still advance). `action="stop"` also saves `<log_dir>/checkpoints/nonfinite-step=N.ckpt`,
    which holds the last finite weights, and stops training."""

    def __init__(self, action: Literal["skip", "stop"] = "stop", check_every_n_steps: int = 1) -> None:
        if action not in ("skip", "stop"):
            raise ValueError(f"action: expected 'skip' or 'stop', got {action!r}")
        if not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps: expected a positive integer, got {check_every_n_steps!r}")
        self.action = action
        self.check_every_n_steps = check_every_n_steps
        self.skipped = 0
        self.last_report: dict[str, Any] | None = None
        # The micro-batches and losses of the step being accumulated (several under gradient accumulation).
        self._batches: list[tuple[Any, int]] = []
        self._losses: list[Tensor] = []

    def _due(self, trainer: L.Trainer) -> bool:
        return trainer.global_step % self.check_every_n_steps == 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._due(trainer):
            self._batches.append((batch, batch_idx))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if self._due(trainer):
            self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if not self._due(trainer):
            return
        batches, losses, self._batches, self._losses = self._batches, self._losses, [], []
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            grads = []  # fp16's GradScaler expects overflowing gradients now and then: it skips those steps itself
        # One multi-tensor kernel (as in clip_grad_norm_); a tensor's max-norm is NaN or inf exactly when one of
        # its elements is, and cannot overflow.
        values = [*losses, *torch._foreach_norm(grads, float("inf"))] if grads else losses
        if not values:
            return
        finite = bool(torch.stack([v.float() for v in values]).isfinite().all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        report = self._report(trainer, pl_module, batches, losses)
        for p in params:
            p.grad = None
        self.skipped += 1
        pl_module.log("train/nonfinite_skipped", float(self.skipped))
        if self.action == "stop":
            path = Path(trainer.log_dir) / "checkpoints" / f"nonfinite-step={trainer.global_step}.ckpt"
            trainer.save_checkpoint(path)
            trainer.should_stop = True
            report["checkpoint"] = str(path)
            report["message"] += f"; stopping, the last finite weights are in {path}"
        else:
            report["message"] += "; step skipped"
        self.last_report = report
        log.warning(report["message"])

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, batches: list[tuple[Any, int]], losses: list[Tensor]) -> dict[str, Any]:
        kind = "gradient" if all(bool(loss.isfinite().all()) for loss in losses) else "loss"
        module, module_type = self._first_nonfinite_output(trainer, pl_module, batches)
        grad_params = [
            name for name, p in reversed(list(pl_module.model.named_parameters()))
            if p.grad is not None and not bool(p.grad.isfinite().all())
        ]
        output = f"first non-finite output in {module} ({module_type})" if module else "every module output finite"
        gradients = f"non-finite gradients in {len(grad_params)} tensors, nearest the loss {grad_params[0]}" if grad_params else "every gradient finite"
        return {
            "step": trainer.global_step, "kind": kind, "module": module, "module_type": module_type,
            "grad_params": grad_params, "action": self.action,
            "message": f"non-finite {kind} at step {trainer.global_step}: {output}; {gradients}",
        }

    @staticmethod
    def _first_nonfinite_output(trainer: L.Trainer, pl_module: L.LightningModule, batches: list[tuple[Any, int]]) -> tuple[str | None, str | None]:
        """Replays training_step on the step's batches without gradients, under forward hooks on every module of
        `pl_module.model`: the first to return a non-finite tensor (hooks run as modules finish, so the innermost
        one) and its class. The RNG is forked so that the run's random stream is unchanged; dropout masks are
        therefore fresh ones."""
        found: list[tuple[str, nn.Module]] = []

        def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
            def check(module: nn.Module, args: Any, output: Any) -> None:
                if not found and not all(bool(t.isfinite().all()) for t in _float_tensors(output)):
                    found.append((name, module))
            return check

        handles = [m.register_forward_hook(hook(name)) for name, m in pl_module.model.named_modules() if name]
        rng_devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(rng_devices), _muted_logging(pl_module), trainer.precision_plugin.train_step_context():
                for batch, batch_idx in batches:
                    pl_module.training_step(batch, batch_idx)
                    if found:
                        break
        finally:
            for handle in handles:
                handle.remove()
        if not found:
            return None, None
        name, module = found[0]
        return name, type(module).__name__
