import time
from collections import deque

import lightning as L
import torch

from soma_lightning.measure import train_flops_per_token

# Dense bf16 tensor-core peaks (FLOP/s), from the vendors' datasheets (SXM parts).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


class Throughput(L.Callback):
    """Logs, and shows in the progress bar, train/tokens_per_s, train/tflops and train/mfu (against the dense
    bf16 peak of the GPU, when known), over the last `window` steps. FLOPs per token are the spec's analytic
    count (measure.py)."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self.times: deque[float] = deque(maxlen=window + 1)
        self.tokens: deque[int] = deque(maxlen=window)
        self.flops_per_token: float | None = None
        self.peak: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak = device_peak_flops(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.times.append(time.perf_counter())
        tokens = batch["tokens"]
        self.tokens.append(tokens.numel() * trainer.world_size)
        if self.flops_per_token is None:
            self.flops_per_token = train_flops_per_token(pl_module.model, tokens.shape[1])
        if len(self.times) < 2:
            return
        steps = len(self.times) - 1
        tokens_per_s = sum(list(self.tokens)[-steps:]) / (self.times[-1] - self.times[0])
        flops = tokens_per_s * self.flops_per_token
        metrics = {"train/tokens_per_s": tokens_per_s, "train/tflops": flops / 1e12}
        if self.peak:
            metrics["train/mfu"] = flops / (self.peak * trainer.world_size)
        pl_module.log_dict(metrics, prog_bar=True)
