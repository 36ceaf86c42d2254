"""Scale-out on CPU: strategy overlays for every spec, DDP and FSDP2 over 2 gloo processes, resuming on a
different world size, SIGTERM, activation checkpointing and per-block compile."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from soma_lightning.cli import cli_main, main
from soma_lightning.errors import UserError
from soma_lightning.lm import SomaLM
from soma_lightning.spec import spec_from_dict
from conftest import run_config, tiny_v1_arch, train_losses

SPECS = sorted(str(p) for p in Path("specs").glob("*.yaml"))
OVERLAYS = sorted(str(p) for p in Path("specs/strategies").glob("*.yaml"))
TESTS = str(Path(__file__).parent)


class RecordBatches(L.Callback):
    """Writes, per rank, the first 8 tokens of every row of every training batch with its global step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "rows": batch["tokens"][:, :8].tolist()}) + "\n")


class SigtermAtStep(L.Callback):
    """Sends this process SIGTERM after `step` optimizer steps, as a preemption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _callbacks(*callbacks: tuple[str, dict]) -> str:
    return "--trainer.callbacks=" + json.dumps([{"class_path": path, "init_args": args} for path, args in callbacks])


def _fit(*args: str) -> subprocess.CompletedProcess:
    """`soma-lightning fit` in a fresh process: Lightning's DDP launcher re-runs the command line per rank."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "soma_lightning", "fit", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _batches(path: Path) -> dict[int, list]:
    """Global step -> the rows of the global batch, rank 0's rows first."""
    out: dict[int, list] = {}
    for rank in range(2):
        if Path(f"{path}.rank{rank}").exists():
            for line in open(f"{path}.rank{rank}"):
                record = json.loads(line)
                out.setdefault(record["step"], []).extend(record["rows"])
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_strategy_overlay_resolves_with_every_spec(overlay, capsys):
    for spec in SPECS:
        with pytest.raises(SystemExit) as done:
            cli_main(["fit", "--config", spec, "--config", overlay, "--print_config"])
        assert done.value.code == 0, (spec, overlay)
        assert "strategy:" in capsys.readouterr().out


TINY_SPECS = ["specs/quickstart.yaml", "specs/gpt5_moe_tiny.yaml", "specs/hybrid_tiny.yaml", "specs/sosm_tiny.yaml"]


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_every_parameter_gets_a_gradient_in_a_training_step(spec):
    """DDP refuses parameters without a gradient, and FSDP2's gradient reduction assumes there are none."""
    import yaml
    from soma_lightning.data_modules import ByteCorpus

    cfg = yaml.safe_load(open(spec))
    module = SomaLM(spec_from_dict(cfg["model"]["arch"]))
    annotations = {k: v for k, v in cfg["data"]["init_args"].items() if k in ("doc_ids", "structure")}
    data = ByteCorpus(seq_len=64, batch_size=2, **annotations)
    data.setup()
    module.training_step(next(iter(data.train_dataloader())), 0).backward()
    assert [name for name, p in module.named_parameters() if p.grad is None] == []


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["specs/gpt5_moe_tiny.yaml", "specs/hybrid_tiny.yaml"])
def test_moe_specs_train_under_fsdp2_like_ddp(spec, tmp_path):
    """2 gloo processes each: FSDP2 gives DDP's losses and weights on the MoE specs (hybrid_tiny also has MTP
    heads inside its blocks). Once, rank zero's parameter count (RunInfo) indexed an expert out of a sharded
    weight, an all-gather the other rank never joined; and the in-block MTP heads passed their predictions
    around the block, so FSDP2 lost those of all blocks but the first and ran backward on freed parameters."""
    for strategy in ("ddp", "fsdp2"):
        _fit(
            "--config", spec, "--config", f"specs/strategies/{strategy}.yaml", "--trainer.devices", "2", "--trainer.max_steps", "3",
            "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--trainer.deterministic", "true",
            "--data.init_args.batch_size", "2", "--data.init_args.seq_len", "64", "--data.init_args.val_batch_size", "2",
            "--trainer.logger=" + json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": strategy}}),
        )
        main(["export", "--ckpt", str(tmp_path / f"{strategy}/version_0/checkpoints/last.ckpt"), "--out", str(tmp_path / f"{strategy}.safetensors")])
    ddp, fsdp2 = load_file(tmp_path / "ddp.safetensors"), load_file(tmp_path / "fsdp2.safetensors")
    assert sorted(ddp) == sorted(fsdp2)
    for key in ddp:
        torch.testing.assert_close(fsdp2[key], ddp[key], rtol=1e-5, atol=1e-6)
    losses = {s: train_losses(tmp_path / f"{s}/version_0/metrics.csv") for s in ("ddp", "fsdp2")}
    assert sorted(losses["ddp"]) == [0, 1, 2]
    assert list(losses["fsdp2"].values()) == pytest.approx(list(losses["ddp"].values()), rel=1e-5)


def test_unknown_strategy_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "specs/quickstart.yaml", "--trainer.strategy", "fsdp3"])
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith("soma-lightning: error: trainer: ")


@pytest.mark.parametrize("overlay", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_on_the_cpu_or_without_the_extra_is_a_one_line_error(overlay, capsys, monkeypatch):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "specs/quickstart.yaml", "--config", f"specs/strategies/{overlay}.yaml", "--trainer.accelerator", "cpu"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1
    assert err.startswith("soma-lightning: error: trainer.strategy: ") and "runs on CUDA GPUs only" in err, err
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "specs/quickstart.yaml", "--config", f"specs/strategies/{overlay}.yaml", "--trainer.accelerator", "gpu"])
    assert "needs the deepspeed extra" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_on_two_processes_keeps_the_global_data_order_and_the_losses(tmp_path):
    """One process with batch 4 stops at step 3; the run resumes on 2 gloo processes with batch 2 each. The
    global batches are the same rows in the same order, and (SIGReg off, so that the loss is a mean over
    rows) the losses agree with an uninterrupted one-process run to float tolerance."""
    record = tmp_path / "batches"
    record.mkdir()
    common = ["--model.sigreg.coefficient", "0", "--seed_everything", "1"]
    config = str(run_config(tmp_path, "one", 6, dropout=0.0))
    _fit("--config", config, *common, _callbacks(("test_scale_out.RecordBatches", {"path": str(record / "one")})))
    split = str(run_config(tmp_path, "split", 6, dropout=0.0))
    _fit("--config", split, *common, _callbacks(("conftest.StopAtStep", {"step": 3})))
    _fit(
        "--config", split, *common, "--ckpt_path", "last", "--trainer.devices", "2", "--config", "specs/strategies/ddp.yaml",
        "--data.init_args.batch_size", "2", _callbacks(("test_scale_out.RecordBatches", {"path": str(record / "two")})),
    )
    one, two = _batches(record / "one"), _batches(record / "two")
    assert sorted(two) == [3, 4, 5]
    assert all(two[s] == one[s] for s in two)
    straight = train_losses(tmp_path / "runs/one/version_0/metrics.csv", "train/ce")
    resumed = train_losses(tmp_path / "runs/split/version_0/metrics.csv", "train/ce")  # the resumed run continues its directory
    assert sorted(resumed) == list(range(6))
    assert [resumed[s] for s in (3, 4, 5)] == pytest.approx([straight[s] for s in (3, 4, 5)], rel=1e-5)


@pytest.mark.slow
def test_fsdp2_trains_like_ddp_and_exports_one_consolidated_file(tmp_path):
    """2 gloo processes each: FSDP2 (one shard unit per block, sharded checkpoint folders) and DDP reach the
    same weights; `soma-lightning export` consolidates the FSDP2 folder into one file equal to DDP's. K1
    attribution sees the same gradient norms under both (reduced by DDP, summed over shards under FSDP2) as
    one process with the whole batch (SIGReg off, so that the gradient is a mean over rows)."""
    k1 = _callbacks(("soma_lightning.callbacks.K1Attribution", {"every_n_steps": 1}))
    no_sigreg = ["--model.sigreg.coefficient", "0"]
    for strategy in ("ddp", "fsdp2"):
        config = str(run_config(tmp_path, strategy, 4, dropout=0.0))
        _fit("--config", config, *no_sigreg, "--trainer.devices", "2", "--config", f"specs/strategies/{strategy}.yaml", "--data.init_args.batch_size", "2", k1)
    _fit("--config", str(run_config(tmp_path, "one", 4, dropout=0.0)), *no_sigreg, k1)
    sharded = tmp_path / "runs/fsdp2/version_0/checkpoints/last.ckpt"
    assert sharded.is_dir() and (sharded / "meta.pt").is_file()
    assert not list(sharded.parent.glob("*.tmp")) and not list(sharded.parent.glob("*.old"))
    for strategy in ("ddp", "fsdp2"):
        main(["export", "--ckpt", str(tmp_path / f"runs/{strategy}/version_0/checkpoints/last.ckpt"), "--out", str(tmp_path / f"{strategy}.safetensors")])
    ddp, fsdp2 = load_file(tmp_path / "ddp.safetensors"), load_file(tmp_path / "fsdp2.safetensors")
    assert sorted(ddp) == sorted(fsdp2) and len(ddp) > 10
    for key in ddp:
        torch.testing.assert_close(fsdp2[key], ddp[key], rtol=1e-5, atol=1e-6)
    losses = {s: train_losses(tmp_path / f"runs/{s}/version_0/metrics.csv") for s in ("ddp", "fsdp2", "one")}
    assert list(losses["fsdp2"].values()) == pytest.approx(list(losses["ddp"].values()), rel=1e-5)
    assert list(losses["ddp"].values()) == pytest.approx(list(losses["one"].values()), rel=1e-5)
    paths = {s: [json.loads(line)["path"] for line in open(tmp_path / f"runs/{s}/version_0/k1_attribution.jsonl")] for s in ("ddp", "fsdp2", "one")}
    assert len(paths["one"]) == 4
    for strategy in ("ddp", "fsdp2"):
        for got, want in zip(paths[strategy], paths["one"], strict=True):
            assert [n["node"] for n in got] == [n["node"] for n in want]
            assert [n["share"] for n in got] == pytest.approx([n["share"] for n in want], rel=1e-4)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    """SIGTERM after step 5 ends the process with status 0 and a last.ckpt at step 5; resuming from it gives
    bitwise the losses of an uninterrupted run (dropout on: its masks follow the data position)."""
    cli_main(["fit", "--config", str(run_config(tmp_path, "straight", 8))])
    split = str(run_config(tmp_path, "split", 8))
    _fit("--config", split, _callbacks(("test_scale_out.SigtermAtStep", {"step": 5})))
    ckpt = torch.load(tmp_path / "runs/split/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5
    cli_main(["fit", "--config", split, "--ckpt_path", "last"])
    straight = train_losses(tmp_path / "runs/straight/version_0/metrics.csv")
    resumed = train_losses(tmp_path / "runs/split/version_0/metrics.csv")  # the resumed run continues its directory
    assert resumed == straight and sorted(resumed) == list(range(8))


def _module(dropout: float = 0.1, **flags) -> SomaLM:
    torch.manual_seed(0)
    return SomaLM(spec_from_dict(tiny_v1_arch(d_model=32, hidden_dim=64, dropout=dropout)), **flags)


def _loss_and_grads(module: SomaLM, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.configure_model()
    torch.manual_seed(1)
    logits = module.model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), [p.grad for p in module.parameters()]


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    tokens = torch.randint(0, 256, (2, 24))
    loss, grads = _loss_and_grads(_module(), tokens)
    loss_ac, grads_ac = _loss_and_grads(_module(activation_checkpointing=True), tokens)
    assert loss_ac == loss
    for g, g_ac in zip(grads, grads_ac, strict=True):
        torch.testing.assert_close(g_ac, g, rtol=0, atol=0)


def test_per_block_compile_matches_eager():
    """Without dropout: inductor draws its dropout masks with its own generator, so they differ from eager's."""
    tokens = torch.randint(0, 256, (2, 24))
    loss, grads = _loss_and_grads(_module(dropout=0.0), tokens)
    loss_c, grads_c = _loss_and_grads(_module(dropout=0.0, compile=True), tokens)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for g, g_c in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-6)


def test_float8_swaps_the_block_linears_and_trains_close_to_float32():
    """torchao's float8 Linear runs on CPU too (slowly): the blocks' Linear layers are swapped, the state-dict
    keys stay, and loss and gradients move by float8 rounding (e4m3 keeps 3 mantissa bits), not more."""
    tokens = torch.randint(0, 256, (2, 24))
    loss, grads = _loss_and_grads(_module(dropout=0.0), tokens)
    module = _module(dropout=0.0, float8=True)
    keys = list(module.state_dict())
    loss8, grads8 = _loss_and_grads(module, tokens)
    swapped = [name for name, m in module.model.named_modules() if type(m).__name__ == "Float8Linear"]  # not public in torchao
    assert len(swapped) == 2 * 4 + 2 * 2  # per block: q, k, v, out projections and the MLP's two layers
    assert all(name.startswith("encoder.layers.") for name in swapped)
    assert list(module.state_dict()) == keys
    assert loss8 != loss  # float8 arithmetic ran
    torch.testing.assert_close(loss8, loss, rtol=2e-3, atol=0)
    for g, g8 in zip(grads, grads8, strict=True):
        assert ((g8 - g).norm() / g.norm()).item() < 0.15


def test_float8_without_torchao_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(UserError, match=r"model.float8: needs torchao .*pip install 'soma-lightning\[float8\]'"):
        _module(float8=True)
