"""NonFiniteGuard: catches a non-finite loss or gradient before the optimizer applies it, names where it arose,
then skips the step or stops after a checkpoint."""

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from torch import Tensor, nn

from soma_lightning.nn.tensor_parallel import local

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


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@dataclass
class _Pending:
    """A step checked on the device, whose verdict is read back at the next optimizer step."""

    step: int
    batches: list[tuple[Any, int]]
    n_losses: int
    params: list[Tensor]  # those with a gradient, in the order of their norms in `values`
    values: Tensor  # host copy of [non-finite flag (any rank), losses..., gradient max-norms...]
    event: torch.cuda.Event | None  # recorded after the copy was queued; None on the CPU


class NonFiniteGuard(L.Callback):
    """Every `check_every_n_steps` optimizer steps, checks the loss and the gradients in one fused test in
    `on_before_optimizer_step`: after backward and AMP unscaling, before gradient clipping and the optimizer
    step. When something is non-finite it replays the step's training_step under forward hooks to name the first
    module of `pl_module.model` whose output is non-finite, lists the parameters whose gradients are (nearest the
    loss first), logs that as one line and keeps it in `last_report`, then drops the step, so that AdamW leaves
    the parameters and its own state as they were (the global step and the LR schedule still advance).
    `action="stop"` also saves `<log_dir>/checkpoints/nonfinite-step=N.ckpt` (N the bad step), which holds the
    last finite weights, and stops training.

    With a fused optimizer (every param group `fused=True`, as SomaLM's AdamW on CUDA) on CUDA, on one device or
    under DDP, and without fp16's GradScaler, the check never makes the host wait for the GPU: the verdict stays
    on the device as the optimizer's `found_inf`, which the fused kernel reads to leave the parameters and its
    state alone, as GradScaler does. A host copy of it is read at the next optimizer step (or at the end of
    training), so the report, the count and a stop come one step after the bad step; `action="stop"` then drops
    that step too, so the weights stay the last finite ones. Elsewhere the test is read at once (one host sync)
    and the step is dropped by setting every gradient to None."""

    _sync_free_devices: tuple[str, ...] = ("cuda",)

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
        self._pending: _Pending | None = None
        self._flagged: torch.optim.Optimizer | None = None  # holds our found_inf until its step is done

    def _due(self, trainer: L.Trainer) -> bool:
        return trainer.global_step % self.check_every_n_steps == 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._due(trainer):
            self._batches.append((batch, batch_idx))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if self._due(trainer):
            self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        optimizer = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        # Resolved now whatever the schedule: the weights are still those the pending step saw, so the replay is
        # exact and a stop's checkpoint holds the last finite weights.
        if self._pending is not None and self._resolve_pending(trainer, pl_module, in_loop=True) and self.action == "stop":
            self._batches, self._losses = [], []
            for p in _params(optimizer):
                p.grad = None
            return
        if not self._due(trainer):
            return
        batches, losses, self._batches, self._losses = self._batches, self._losses, [], []
        if self._sync_free(trainer, optimizer):
            self._check_on_device(trainer, optimizer, batches, losses)
        else:
            self._check_now(trainer, pl_module, optimizer, batches, losses)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimizer step: a flag left on the optimizer would skip (1.0) every later step.
        if self._flagged is not None:
            vars(self._flagged).pop("found_inf", None)
            self._flagged = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            self._resolve_pending(trainer, pl_module, in_loop=False)

    def _sync_free(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the optimizer skips a step by itself on a device flag: a fused torch optimizer (the flag a
        GradScaler would set) whose parameters are on a device that runs ahead of the host, on one device or
        under DDP. DeepSpeed steps its own optimizer; fp16's GradScaler sets found_inf itself."""
        strategy, params = trainer.strategy, _params(optimizer)
        return (
            isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy)
            and getattr(trainer.precision_plugin, "scaler", None) is None
            and getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(group.get("fused") for group in optimizer.param_groups)
            and bool(params) and all(p.device.type in self._sync_free_devices for p in params)
        )

    def _check_now(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer,
        batches: list[tuple[Any, int]], losses: list[Tensor],
    ) -> None:
        """Reads the test back at once (one host sync) and drops a bad step by clearing the gradients."""
        params = _params(optimizer)
        # Each rank's shards (tensor parallel shards over meshes that one stack could not mix); all ranks vote below.
        grads = [g for p in params if p.grad is not None and (g := local(p.grad)).numel()]  # a shard may be empty
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
        bad_grads = {id(p) for p in pl_module.model.parameters() if p.grad is not None and not bool(p.grad.isfinite().all())}
        losses_finite = all(bool(loss.isfinite().all()) for loss in losses)
        report = self._report(trainer, pl_module, trainer.global_step, batches, losses_finite, bad_grads)
        for p in params:
            p.grad = None
        self._act(trainer, pl_module, report, in_loop=True)

    def _check_on_device(
        self, trainer: L.Trainer, optimizer: torch.optim.Optimizer, batches: list[tuple[Any, int]], losses: list[Tensor],
    ) -> None:
        """Leaves the verdict on the device as the optimizer's found_inf, and queues its copy to the host."""
        params = [p for p in _params(optimizer) if p.grad is not None]
        values = [*losses, *torch._foreach_norm([p.grad for p in params], float("inf"))] if params else losses
        if not values:
            return
        stacked = torch.stack([v.float() for v in values])
        # float32 1.0 or 0.0: the fused kernels skip on exactly 1.0 and subtract it from their step counts.
        flag = stacked.isfinite().all().logical_not().float()
        if isinstance(trainer.strategy, DDPStrategy):
            # Not strategy.reduce: Lightning puts a barrier before its all-reduce, and that waits on the host.
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        optimizer.found_inf = flag
        self._flagged = optimizer
        host = torch.cat([flag.view(1), stacked]).to("cpu", non_blocking=True)  # into pinned memory: no wait
        event = None
        if flag.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending = _Pending(trainer.global_step, batches, len(losses), params, host, event)

    def _resolve_pending(self, trainer: L.Trainer, pl_module: L.LightningModule, in_loop: bool) -> bool:
        """Reads the verdict of the step checked on the device and, if it was non-finite, reports it (that step
        was already dropped on the device). Whether it was."""
        pending, self._pending = self._pending, None
        if pending.event is not None:
            # Recorded a step ago: the device is normally past it, and the host does not wait for the queue to drain.
            pending.event.synchronize()
        flag, *values = pending.values.tolist()
        if not flag:
            return False
        losses, norms = values[: pending.n_losses], values[pending.n_losses :]
        bad_grads = {id(p) for p, norm in zip(pending.params, norms) if not math.isfinite(norm)}
        report = self._report(trainer, pl_module, pending.step, pending.batches, all(map(math.isfinite, losses)), bad_grads)
        report["message"] += f" (read at step {trainer.global_step}: the step was skipped on the device)"
        self._act(trainer, pl_module, report, in_loop)
        return True

    def _act(self, trainer: L.Trainer, pl_module: L.LightningModule, report: dict[str, Any], in_loop: bool) -> None:
        """Counts and logs a dropped step; for "stop", checkpoints the (last finite) weights and stops."""
        self.skipped += 1
        if in_loop:
            pl_module.log("train/nonfinite_skipped", float(self.skipped))
        else:  # self.log is refused in on_train_end
            for logger in trainer.loggers:
                logger.log_metrics({"train/nonfinite_skipped": float(self.skipped)}, step=trainer.global_step)
        if self.action == "stop":
            path = Path(trainer.log_dir) / "checkpoints" / f"nonfinite-step={report['step']}.ckpt"
            trainer.save_checkpoint(path)
            trainer.should_stop = True
            report["checkpoint"] = str(path)
            report["message"] += f"; stopping, the last finite weights are in {path}"
        else:
            report["message"] += "; step skipped"
        self.last_report = report
        log.warning(report["message"])

    def _report(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, batches: list[tuple[Any, int]],
        losses_finite: bool, bad_grads: set[int],
    ) -> dict[str, Any]:
        """`bad_grads`: the ids of the parameters whose gradients are non-finite."""
        kind = "gradient" if losses_finite else "loss"
        module, module_type = self._first_nonfinite_output(trainer, pl_module, batches)
        grad_params = [name for name, p in reversed(list(pl_module.model.named_parameters())) if id(p) in bad_grads]
        output = f"first non-finite output in {module} ({module_type})" if module else "every module output finite"
        gradients = f"non-finite gradients in {len(grad_params)} tensors, nearest the loss {grad_params[0]}" if grad_params else "every gradient finite"
        return {
            "step": step, "kind": kind, "module": module, "module_type": module_type,
            "grad_params": grad_params, "action": self.action,
            "message": f"non-finite {kind} at step {step}: {output}; {gradients}",
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
