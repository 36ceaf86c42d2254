"""NonFiniteGuard on a tiny SomaLM rigged to go non-finite in encoder.layers.1.pwff at one step: it names the
module or the parameters, and skips the step or stops after a checkpoint of the last finite weights."""

import csv
import json
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


def fit(lm: SomaLM, guard: NonFiniteGuard, tmp_path, max_steps: int) -> tuple[L.Trainer, Snapshots]:
    snapshots = Snapshots()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=[guard, snapshots], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(lm, loader())
    return trainer, snapshots


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
