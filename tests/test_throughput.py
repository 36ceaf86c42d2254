"""The Throughput callback: rates over each logging interval from a clock read only at synchronised points, a
device synchronisation only where a measurement starts or ends (no per-step sync), tokens counted per batch
replica, and the peak memory of any rank."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader

import soma_lightning.callbacks.throughput as throughput
from soma_lightning.callbacks import Throughput

# Batch i of an epoch: tokens of shape [2, 3 + i], i.e. 6, 8, ..., 20 tokens.
BATCHES = [{"tokens": torch.zeros(2, 3 + i, dtype=torch.long)} for i in range(8)]
TRAIN_SECONDS, VAL_SECONDS = 1.0, 50.0  # per batch, on the fake clock


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch, batch_idx):
        return self.w * batch["tokens"].float().mean() + self.w**2

    def validation_step(self, batch, batch_idx):
        pass

    def train_dataloader(self):
        return DataLoader(BATCHES, batch_size=None)

    def val_dataloader(self):
        return DataLoader(BATCHES, batch_size=None)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))


class _Clock(L.Callback):
    """A fake perf_counter: each training batch takes TRAIN_SECONDS, each validation batch VAL_SECONDS."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def on_train_batch_start(self, *args) -> None:
        self.now += TRAIN_SECONDS

    def on_validation_batch_start(self, *args) -> None:
        self.now += VAL_SECONDS


class _ChunksAfterTheStep(_Module):
    """Leaves the batch holding one token of each sequence after the step, as context parallel leaves a rank its
    chunks."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        batch["tokens"] = batch["tokens"][:, :1]
        return loss


class _ThreeReplicas(SingleDeviceStrategy):
    """One process standing in for a mesh of three batch replicas, another rank's peak memory twice this one's."""

    def __init__(self) -> None:
        super().__init__(device=torch.device("cpu"))
        self.reductions: list[str] = []

    @property
    def distributed_sampler_kwargs(self) -> dict:
        return {"num_replicas": 3, "rank": 0}

    def reduce(self, tensor, group=None, reduce_op="mean"):
        self.reductions.append(reduce_op)
        return tensor * 2 if reduce_op == "max" else tensor  # Lightning's own reductions (sums) pass through


def _fit(monkeypatch, module: L.LightningModule | None = None, **trainer_args) -> tuple[L.Trainer, _Recorder, list[tuple[str, int]]]:
    clock, recorder, syncs = _Clock(), _Recorder(), []
    monkeypatch.setattr(throughput, "perf_counter", clock)
    callback = Throughput()
    callback.flops_per_token = 6.0  # the toy module has no spec model to count
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=recorder, callbacks=[clock, callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **trainer_args,
    )
    # Stands in for the device: every synchronisation, when it happens.
    monkeypatch.setattr(throughput, "synchronize", lambda device: syncs.append(("val" if trainer.validating else "train", trainer.global_step)))
    trainer.fit(module or _Module())
    return trainer, recorder, syncs


def _rates(recorder: _Recorder) -> dict[int, float]:
    return {step: m["train/tokens_per_s"] for step, m in recorder.rows if "train/tokens_per_s" in m}


def test_tokens_per_s_over_each_logging_interval_without_validation_time(monkeypatch):
    trainer, recorder, syncs = _fit(
        monkeypatch, max_steps=10, log_every_n_steps=3, val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=2,
    )
    # Steps 1..10 train on 6, 8, ..., 20, 6, 8 tokens. The interval opens after step 1; Lightning logs steps 3, 6
    # and 9 (logger steps 2, 5, 8); the validations after steps 4 and 8 (100 s each) are left out.
    rates = _rates(recorder)
    assert rates == pytest.approx({2: (8 + 10) / 2, 5: (12 + 14 + 16) / 3, 8: (18 + 20 + 6) / 3})
    for step, m in recorder.rows:
        if step in rates:
            assert m["train/tflops"] == pytest.approx(rates[step] * 6.0 / 1e12) and "train/mfu" not in m  # no CPU peak
    assert trainer.progress_bar_metrics["train/tokens_per_s"] == pytest.approx((18 + 20 + 6) / 3)
    # Synchronised: after the first batch, on each logged step, at each validation's start and end; nowhere else
    # (not in the sanity check either).
    assert syncs == [("train", 1), ("train", 3), ("val", 4), ("val", 4), ("train", 6), ("val", 8), ("val", 8), ("train", 9)]
    assert [s for kind, s in syncs if kind == "train"][1:] == [step + 1 for step in rates]


def test_tokens_per_s_under_gradient_accumulation(monkeypatch):
    # Two micro-batches a step: tokens are counted for each, a log comes only after the step's last one.
    trainer, recorder, syncs = _fit(monkeypatch, max_steps=4, log_every_n_steps=2, accumulate_grad_batches=2, limit_val_batches=0)
    assert _rates(recorder) == pytest.approx({1: (8 + 10 + 12) / 3, 3: (14 + 16 + 18 + 20) / 4})
    assert syncs == [("train", 0), ("train", 2), ("train", 4)]


def test_tokens_are_counted_per_batch_replica_as_the_batch_arrived(monkeypatch):
    # Tensor and context parallel ranks share a batch: a step trains on one batch per replica, not per rank; and
    # the batch is read before the step, which under context parallel leaves a rank its chunks only.
    _, recorder, _ = _fit(monkeypatch, module=_ChunksAfterTheStep(), strategy=_ThreeReplicas(), max_steps=4, log_every_n_steps=2, limit_val_batches=0)
    assert _rates(recorder) == pytest.approx({1: 3 * 8, 3: 3 * (10 + 12) / 2})


def test_peak_memory_is_the_largest_of_any_rank_and_logged_on_cuda_only(monkeypatch):
    _, recorder, _ = _fit(monkeypatch, max_steps=4, log_every_n_steps=2, limit_val_batches=0)
    assert not [m for _, m in recorder.rows if "train/peak_memory_gib" in m]
    monkeypatch.setattr(throughput, "peak_memory", lambda device: 3 * 2**29)  # 1.5 GiB, as CUDA would report
    strategy = _ThreeReplicas()
    _, recorder, _ = _fit(monkeypatch, strategy=strategy, max_steps=4, log_every_n_steps=2, limit_val_batches=0)
    assert {step: m["train/peak_memory_gib"] for step, m in recorder.rows if "train/peak_memory_gib" in m} == {1: 3.0, 3: 3.0}
    assert strategy.reductions.count("max") == 2


def test_synchronize_waits_for_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    throughput.synchronize(torch.device("cpu"))
    throughput.synchronize(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


def test_window_is_deprecated():
    with pytest.warns(FutureWarning, match="`window` is ignored"):
        Throughput(window=10)
