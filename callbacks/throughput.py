"""Training throughput (tokens/s, TFLOP/s, MFU) over each logging interval, with one device synchronisation per
log rather than one per step, and the peak GPU memory of any rank."""

import warnings
from time import perf_counter

import lightning as L
import torch

from soma_lightning.measure import train_flops_per_token
from soma_lightning.parallel.mesh import batch_replica

# Dense bf16 tensor-core peaks (FLOP/s), from the vendors' datasheets (SXM parts).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    """Waits until the device has run everything queued on it (CUDA; other devices here run synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int | None:
    """Bytes torch.cuda.max_memory_allocated reports for `device`; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def lightning_logs_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes the step metrics of the batch that has just ended; asked in on_train_batch_end.
    The condition of `_LoggerConnector.update_train_step_metrics`, which runs right after that hook: nothing while
    gradients accumulate, else every `log_every_n_steps` optimizer steps, on the step the trainer stops at, and
    every step under fast_dev_run."""
    if trainer.fit_loop._should_accumulate() and trainer.lightning_module.automatic_optimization:
        return False
    return trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run)


class Throughput(L.Callback):
    """Logs, and shows in the progress bar, train/tokens_per_s, train/tflops and train/mfu (against the dense
    bf16 peak of the GPU, when known), each the mean over the steps since the previous log. FLOPs per token are
    the spec's analytic count (measure.py). On CUDA it also logs train/peak_memory_gib: the largest
    torch.cuda.max_memory_allocated of any rank since training started.

    Tokens. A step trains on each batch replica's batch (the ranks that read different batches: the world size
    under DDP and FSDP2, fewer under tensor and context parallel, whose ranks share a batch), read as it
    arrives: context parallel leaves each rank its chunks of the sequence after the step.

    Timing. CUDA runs asynchronously: when a step's hooks return, the host has only queued the step's kernels,
    so a host timestamp taken then is early by whatever work is still queued, and the difference of two such
    timestamps is off by the change in that backlog. Right after a synchronisation the backlog is empty, so the
    interval between two synchronised timestamps is exactly the time the device took for the steps between them.
    The callback therefore synchronises only where a measurement starts or ends: once after the first batch of a
    fit (which, with its compilation and warm-up, is left out), on each step Lightning logs (log_every_n_steps),
    and at the start and end of each validation run inside training (whose time is left out). Other steps do not
    wait for the device. The logged values are CPU tensors: Lightning keeps a logged value on its tensor's device
    and reads progress-bar values back with .item() after every batch, which for a CUDA tensor would wait for
    the device on every step again."""

    def __init__(self, window: int | None = None) -> None:
        if window is not None:
            warnings.warn(
                "Throughput: `window` is ignored and will be removed; the rates are means over each logging interval "
                "(trainer.log_every_n_steps)", FutureWarning, stacklevel=2,
            )
        self.window = window
        self.flops_per_token: float | None = None
        self.peak: float | None = None
        self._reset()

    def _reset(self) -> None:
        self._start: float | None = None  # the synchronised time the current interval began or resumed at
        self._elapsed = 0.0  # training time of the current interval before its last pause (validation)
        self._tokens = 0  # tokens trained on in the current interval, all ranks
        self._paused = False
        self._batch_shape: tuple[int, int] | None = None  # the current batch's tokens [B, T], as it arrived

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak = device_peak_flops(pl_module.device)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._reset()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._batch_shape = tuple(batch["tokens"].shape)  # host-side: reading it does not wait for the device

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        rows, length = self._batch_shape
        if self._start is None:  # the fit's first batch: measure from its end on
            synchronize(pl_module.device)
            self._start = perf_counter()
            return
        self._tokens += rows * length * batch_replica(trainer.strategy, trainer.global_rank, trainer.world_size)[1]
        if not lightning_logs_this_step(trainer):
            return
        synchronize(pl_module.device)
        now = perf_counter()
        seconds, count = self._elapsed + now - self._start, self._tokens
        self._start, self._elapsed, self._tokens = now, 0.0, 0
        if seconds <= 0:
            return
        if self.flops_per_token is None:
            self.flops_per_token = train_flops_per_token(pl_module.model, length)
        tokens_per_s = count / seconds
        flops = tokens_per_s * self.flops_per_token
        metrics = {"train/tokens_per_s": tokens_per_s, "train/tflops": flops / 1e12}
        if self.peak:
            metrics["train/mfu"] = flops / (self.peak * trainer.world_size)
        pl_module.log_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}, prog_bar=True)
        memory = peak_memory(pl_module.device)
        if memory is not None:  # one collective on the steps every rank logs; the device is idle by now
            largest = trainer.strategy.reduce(torch.tensor(float(memory), device=pl_module.device), reduce_op="max")
            pl_module.log("train/peak_memory_gib", torch.tensor(largest.item() / 2**30, dtype=torch.float64))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._start is None or self._paused:
            return
        synchronize(pl_module.device)
        self._elapsed += perf_counter() - self._start
        self._paused = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._paused:
            return
        synchronize(pl_module.device)
        self._start = perf_counter()
        self._paused = False
