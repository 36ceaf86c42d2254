"""NonFiniteGuard on a tiny SomaLM rigged to go non-finite in encoder.layers.1.pwff at one step: it names the
module or the parameters, and skips the step or stops after a checkpoint of the last finite weights."""

import csv
from typing import Literal

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from soma_lightning.callbacks.nonfinite import NonFiniteGuard
from soma_lightning.cli import cli_main
from soma_lightning.data_modules.contract import PAD
from soma_lightning.lm import OptimConfig, SomaLM
from soma_lightning.spec import spec_from_dict
from conftest import tiny_v1_arch

BAD_STEP = 1
RIGGED = "encoder.layers.1.pwff"


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


def rigged_lm(fault: Literal["output", "gradient"]) -> SomaLM:
    """A tiny SomaLM whose layer-1 feed-forward returns NaN (or passes NaN gradients back) at step BAD_STEP."""
    lm = SomaLM(spec_from_dict(tiny_v1_arch()), optim=OptimConfig(lr=1e-2, warmup_steps=1))

    def fault_at_bad_step(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
        if lm.global_step != BAD_STEP:
            return None
        return torch.full_like(output, float("nan")) if fault == "output" else NanGradient.apply(output)

    lm.model.get_submodule(RIGGED).register_forward_hook(fault_at_bad_step)
    return lm


def loader(n: int = 6, batch_size: int = 2, seq_len: int = 16) -> DataLoader:
    tokens = torch.randint(0, 256, (n, batch_size, seq_len))
    targets = torch.cat([tokens[..., 1:], torch.full((n, batch_size, 1), PAD)], dim=-1)
    positions = torch.arange(seq_len).expand(batch_size, seq_len)
    return DataLoader([{"tokens": t, "targets": y, "positions": positions} for t, y in zip(tokens, targets)], batch_size=None)


class Snapshots(L.Callback):
    """The model's weights before each optimizer step, by step."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: SomaLM, batch, batch_idx: int) -> None:
        self.before[trainer.global_step] = weights(pl_module)


def weights(lm: SomaLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train(lm: SomaLM, guard: NonFiniteGuard, tmp_path, max_steps: int, watcher: L.Callback) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=[guard, watcher], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(lm, loader())
    return trainer


def fit(lm: SomaLM, guard: NonFiniteGuard, tmp_path, max_steps: int) -> tuple[L.Trainer, Snapshots]:
    snapshots = Snapshots()
    return train(lm, guard, tmp_path, max_steps, snapshots), snapshots


def test_skip_names_the_module_and_drops_only_the_bad_step(tmp_path):
    lm, guard = rigged_lm("output"), NonFiniteGuard(action="skip")
    trainer, snapshots = fit(lm, guard, tmp_path, max_steps=4)
    report = guard.last_report
    assert report["step"] == BAD_STEP and report["kind"] == "loss"
    assert report["module"] == RIGGED and report["module_type"] == type(lm.model.get_submodule(RIGGED)).__name__
    assert f"first non-finite output in {RIGGED}" in report["message"]
    assert guard.skipped == 1 and trainer.global_step == 4
    before = snapshots.before
    assert not same(before[0], before[1])
    assert same(before[BAD_STEP], before[BAD_STEP + 1])
    assert not same(before[BAD_STEP + 1], weights(lm))
    assert all(v.isfinite().all() for v in weights(lm).values())
    # AdamW never saw the dropped step: 3 updates of 4 steps.
    adam = trainer.optimizers[0]
    assert all(adam.state[p]["step"] == 3 for p in lm.model.parameters())


def test_a_rank_whose_shard_of_a_parameter_is_empty_is_checked_like_any_other(tmp_path):
    """FSDP2 over more ranks than a small parameter has rows (gpt5_moe's 2-row modality embedding over 4 GPUs)
    leaves some ranks an empty shard, so an empty gradient; torch's infinity norm of an empty tensor is an error."""
    lm, guard = rigged_lm("gradient"), NonFiniteGuard(action="skip")
    lm.model.empty_shard = torch.nn.Parameter(torch.empty(0, 4))
    lm.model.get_submodule("encoder.layers.0.pwff").register_forward_hook(lambda module, args, out: out + lm.model.empty_shard.sum())
    trainer, _ = fit(lm, guard, tmp_path, max_steps=3)
    assert guard.skipped == 1 and guard.last_report["step"] == BAD_STEP and trainer.global_step == 3


def test_stop_checkpoints_the_last_finite_weights_and_stops(tmp_path):
    lm, guard = rigged_lm("output"), NonFiniteGuard(action="stop")
    trainer, snapshots = fit(lm, guard, tmp_path, max_steps=4)
    assert guard.last_report["module"] == RIGGED and guard.skipped == 1
    assert trainer.global_step == BAD_STEP + 1 and sorted(snapshots.before) == [0, BAD_STEP]
    path = tmp_path / "checkpoints" / f"nonfinite-step={BAD_STEP}.ckpt"
    assert guard.last_report["checkpoint"] == str(path)
    ckpt = torch.load(path, weights_only=True)
    saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert ckpt["global_step"] == BAD_STEP
    assert same(saved, snapshots.before[BAD_STEP]) and same(weights(lm), snapshots.before[BAD_STEP])
    assert all(v.isfinite().all() for v in saved.values())


def test_nan_gradient_is_named_by_its_parameters(tmp_path):
    lm, guard = rigged_lm("gradient"), NonFiniteGuard(action="skip")
    fit(lm, guard, tmp_path, max_steps=2)
    report = guard.last_report
    assert report["kind"] == "gradient" and report["module"] is None
    assert report["grad_params"][0] == f"{RIGGED}.linear_outer.bias"  # nearest the loss
    assert not any(name.startswith(("final_norm", "predictor")) for name in report["grad_params"])
    assert guard.skipped == 1


@pytest.mark.parametrize("args, name", [
    ({"action": "ignore"}, "action"), ({"check_every_n_steps": 0}, "check_every_n_steps"), ({"check_every_n_steps": 1.5}, "check_every_n_steps"),
])
def test_bad_arguments_name_the_argument(args, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        NonFiniteGuard(**args)


def test_finite_run_from_yaml_reports_nothing(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open("soma_lightning/corpora/tinyshakespeare.txt").read()[:20_000])
    guard = {"class_path": "soma_lightning.callbacks.nonfinite.NonFiniteGuard", "init_args": {"action": "skip", "check_every_n_steps": 2}}
    cfg = {
        "model": {"arch": tiny_v1_arch()},
        "data": {"class_path": "soma_lightning.data_modules.ByteCorpus", "init_args": {"source": str(corpus), "seq_len": 16, "batch_size": 2, "val_seq_len": 16}},
        "trainer": {
            "accelerator": "cpu", "max_steps": 4, "limit_val_batches": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "callbacks": [guard],
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "guarded"}},
        },
    }
    path = tmp_path / "guarded.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli_main(["fit", "--config", str(path)])
    version = tmp_path / "runs/guarded/version_0"
    rows = list(csv.DictReader(open(version / "metrics.csv")))
    assert len([r for r in rows if r.get("train/loss")]) == 4
    assert not any(r.get("train/nonfinite_skipped") for r in rows)
    assert not list(version.glob("checkpoints/nonfinite-*"))


# The sync-free path: a fused AdamW skips the bad step itself on the guard's found_inf flag, read back a step later.


def batch_rigged_lm(fault: Literal["output", "gradient"]) -> SomaLM:
    """As rigged_lm, but the fault follows the batch (batch_idx BAD_STEP) rather than the step, as a real one follows
    the data and the weights: the device path replays the bad step's batch a step later."""
    lm = SomaLM(spec_from_dict(tiny_v1_arch()), optim=OptimConfig(lr=1e-2, warmup_steps=1))
    training_step, bad_batch = lm.training_step, [False]

    def training_step_noting_the_batch(batch, batch_idx: int):
        bad_batch[0] = batch_idx == BAD_STEP
        return training_step(batch, batch_idx)

    def fault_on_bad_batch(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
        if not bad_batch[0]:
            return None
        return torch.full_like(output, float("nan")) if fault == "output" else NanGradient.apply(output)

    lm.training_step = training_step_noting_the_batch
    lm.model.get_submodule(RIGGED).register_forward_hook(fault_on_bad_batch)
    return lm


@pytest.fixture
def device_path(monkeypatch):
    """The sync-free path on the CPU: SomaLM's AdamW made fused (it is only on CUDA) and the CPU let in. torch's
    fused CPU AdamW honours found_inf as the CUDA kernel does."""
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, fused=None, **kwargs: adamw(params, fused=True, **kwargs))
    monkeypatch.setattr(NonFiniteGuard, "_sync_free_devices", ("cpu",))


class OptimizerWatch(Snapshots):
    """Also, after the guard's hook: the found_inf it left on the optimizer and AdamW's state, by step."""

    def __init__(self) -> None:
        super().__init__()
        self.found_inf: dict[int, float | None] = {}
        self.adam: dict[int, list[dict[str, torch.Tensor]]] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: SomaLM, optimizer: torch.optim.Optimizer) -> None:
        flag = getattr(optimizer, "found_inf", None)
        self.found_inf[trainer.global_step] = None if flag is None else float(flag)
        self.adam[trainer.global_step] = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]


def fit_watched(lm: SomaLM, guard: NonFiniteGuard, tmp_path, max_steps: int) -> tuple[L.Trainer, OptimizerWatch]:
    watch = OptimizerWatch()
    trainer = train(lm, guard, tmp_path, max_steps, watch)
    assert not hasattr(trainer.optimizers[0], "found_inf")
    return trainer, watch


def same_state(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def test_device_path_needs_a_fused_optimizer_on_a_sync_free_device_and_no_grad_scaler(monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy, SingleDeviceStrategy

    p = torch.nn.Parameter(torch.zeros(2))
    fused = torch.optim.AdamW([p], fused=True)
    trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), precision_plugin=Precision())
    guard = NonFiniteGuard()
    assert not guard._sync_free(trainer, fused)  # by default only CUDA runs ahead of the host
    monkeypatch.setattr(NonFiniteGuard, "_sync_free_devices", ("cpu",))
    assert guard._sync_free(trainer, fused)
    assert not guard._sync_free(trainer, torch.optim.AdamW([p], foreach=True))
    assert not guard._sync_free(trainer, torch.optim.SGD([p]))
    assert not guard._sync_free(SimpleNamespace(strategy=trainer.strategy, precision_plugin=SimpleNamespace(scaler=object())), fused)
    for strategy in (DeepSpeedStrategy, ModelParallelStrategy):  # uninitialised: only their types matter
        assert not guard._sync_free(SimpleNamespace(strategy=strategy.__new__(strategy), precision_plugin=Precision()), fused)


def test_device_flag_goes_on_the_torch_optimizer_and_lives_for_its_step_only(device_path):
    from types import SimpleNamespace

    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import SingleDeviceStrategy

    p = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.AdamW([p], fused=True)
    trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), precision_plugin=Precision(), global_step=0)
    guard = NonFiniteGuard(action="skip")
    for grad, flag in ((torch.tensor([1.0, float("inf"), 0.0]), 1.0), (torch.ones(3), 0.0)):
        guard._pending = None  # read back only by the next hook, which needs a model to report on
        guard.on_before_backward(trainer, None, torch.tensor(2.0))
        p.grad = grad
        guard.on_before_optimizer_step(trainer, None, LightningOptimizer(adam))
        assert adam.found_inf.dtype == torch.float32 and float(adam.found_inf) == flag
        adam.step()
        guard.on_train_batch_end(trainer, None, None, None, 0)
        assert not hasattr(adam, "found_inf")
        assert torch.equal(p.detach(), torch.ones(3)) == (flag == 1.0)
        assert float(adam.state[p]["step"]) == 1.0 - flag


def test_device_path_skips_the_bad_step_on_the_device_and_reports_it_a_step_later(tmp_path, device_path):
    lm, guard = batch_rigged_lm("output"), NonFiniteGuard(action="skip")
    trainer, watch = fit_watched(lm, guard, tmp_path, max_steps=4)
    assert watch.found_inf == {0: 0.0, 1: 1.0, 2: 0.0, 3: 0.0}
    report = guard.last_report
    assert report["step"] == BAD_STEP and report["kind"] == "loss" and report["module"] == RIGGED
    assert report["message"].startswith(f"non-finite loss at step {BAD_STEP}: first non-finite output in {RIGGED}")
    assert f"read at step {BAD_STEP + 1}" in report["message"] and report["message"].endswith("; step skipped")
    assert guard.skipped == 1 and trainer.global_step == 4
    before = watch.before
    assert not same(before[0], before[1]) and not same(before[BAD_STEP + 1], weights(lm))
    assert same(before[BAD_STEP], before[BAD_STEP + 1])
    assert same_state(watch.adam[BAD_STEP], watch.adam[BAD_STEP + 1])  # moments and step counts
    adam = trainer.optimizers[0]
    assert all(adam.state[p]["step"] == 3 for p in lm.model.parameters())
    assert all(v.isfinite().all() for v in weights(lm).values())


def test_device_path_stop_drops_the_next_step_too_and_checkpoints_the_last_finite_weights(tmp_path, device_path):
    lm, guard = batch_rigged_lm("output"), NonFiniteGuard(action="stop")
    trainer, watch = fit_watched(lm, guard, tmp_path, max_steps=5)
    assert guard.last_report["module"] == RIGGED and guard.skipped == 1
    assert trainer.global_step == BAD_STEP + 2 and sorted(watch.before) == [0, BAD_STEP, BAD_STEP + 1]
    path = tmp_path / "checkpoints" / f"nonfinite-step={BAD_STEP}.ckpt"
    assert guard.last_report["checkpoint"] == str(path)
    ckpt = torch.load(path, weights_only=True)
    saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert ckpt["global_step"] == BAD_STEP + 1
    assert same(saved, watch.before[BAD_STEP]) and same(weights(lm), watch.before[BAD_STEP])
    adam = trainer.optimizers[0]
    assert all(adam.state[p]["step"] == BAD_STEP for p in lm.model.parameters())


@pytest.mark.parametrize("action", ["skip", "stop"])
def test_device_path_reads_a_bad_last_step_at_the_end_of_training(tmp_path, device_path, action):
    """The gradient fault at the last step: the same report as the synchronous path's, made in on_train_end."""
    sync_guard = NonFiniteGuard(action=action)
    fit(batch_rigged_lm("gradient"), sync_guard, tmp_path / "sync", max_steps=BAD_STEP + 1)
    lm, guard = batch_rigged_lm("gradient"), NonFiniteGuard(action=action)
    trainer, watch = fit_watched(lm, guard, tmp_path, max_steps=BAD_STEP + 1)
    assert watch.found_inf[BAD_STEP] == 1.0 and guard.skipped == 1
    keys = ("step", "kind", "module", "module_type", "grad_params")
    assert {k: guard.last_report[k] for k in keys} == {k: sync_guard.last_report[k] for k in keys}
    assert same(weights(lm), watch.before[BAD_STEP])
    if action == "stop":
        ckpt = torch.load(tmp_path / "checkpoints" / f"nonfinite-step={BAD_STEP}.ckpt", weights_only=True)
        assert same({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}, watch.before[BAD_STEP])


def test_device_path_sets_the_flag_on_due_steps_only_and_never_leaves_it(tmp_path, device_path):
    lm = SomaLM(spec_from_dict(tiny_v1_arch()), optim=OptimConfig(lr=1e-2, warmup_steps=1))
    guard = NonFiniteGuard(action="skip", check_every_n_steps=2)
    trainer, watch = fit_watched(lm, guard, tmp_path, max_steps=4)
    assert watch.found_inf == {0: 0.0, 1: None, 2: 0.0, 3: None}
    assert guard.skipped == 0 and guard.last_report is None
    assert all(trainer.optimizers[0].state[p]["step"] == 4 for p in lm.model.parameters())
