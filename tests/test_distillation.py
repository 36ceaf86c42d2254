"""Distillation (soma_lightning/distillation.py): the loss against its formula, a teacher that stays frozen and
outside the student, weight 0 as the plain objective, the one-line refusals, and fit and resume through the CLI."""

import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

import soma_lightning
from soma_lightning.cli import cli_main
from soma_lightning.distillation import DistillConfig, distillation_loss
from soma_lightning.errors import UserError
from soma_lightning.lm import SomaLM
from soma_lightning.spec import spec_from_dict
from soma_lightning.vocabulary import BYTE_PAD
from conftest import fresh_checkpoint, one_error_line, run_config, tiny_v1_arch, train_losses


def reference_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, pad: int, temperature: float) -> float:
    """T^2 x the mean over non-PAD positions of sum_v p_v (log p_v - log q_v), p and q written out as softmaxes."""
    total, count = 0.0, 0
    for b, t in zip(*torch.nonzero(targets != pad, as_tuple=True)):
        p = torch.exp(teacher[b, t].double() / temperature) / torch.exp(teacher[b, t].double() / temperature).sum()
        q = torch.exp(student[b, t].double() / temperature) / torch.exp(student[b, t].double() / temperature).sum()
        total += (p * (torch.log(p) - torch.log(q))).sum().item()
        count += 1
    return total / count * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_loss_is_the_formula(temperature):
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11) * 3
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 3:] = BYTE_PAD
    extra_ids = torch.cat([teacher, torch.randn(2, 5, 3)], dim=-1)  # a teacher of a larger vocab_size: compared on the student's ids
    loss = distillation_loss(student, extra_ids, targets, BYTE_PAD, temperature)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_loss(student, teacher, targets, BYTE_PAD, temperature), rel=1e-6, abs=1e-6)
    assert distillation_loss(teacher, teacher, targets, BYTE_PAD, temperature).abs().item() < 1e-6
    assert distillation_loss(student.bfloat16(), teacher.bfloat16(), targets, BYTE_PAD, temperature).dtype == torch.float32


def test_gradients_reach_the_student_only():
    student, teacher = torch.randn(1, 4, 7, requires_grad=True), torch.randn(1, 4, 7, requires_grad=True)
    distillation_loss(student, teacher, torch.zeros(1, 4, dtype=torch.long), BYTE_PAD, 2.0).backward()
    assert student.grad is not None and teacher.grad is None


@pytest.mark.parametrize("key, value", [("weight", -0.1), ("weight", math.nan), ("temperature", 0.0)])
def test_config_refuses_a_bad_weight_or_temperature(key, value):
    with pytest.raises(UserError, match=f"^model.distill.{key}: expected a number "):
        DistillConfig(teacher="t", **{key: value})


def batch(rows: int = 2, seq_len: int = 16) -> dict[str, torch.Tensor]:
    text = torch.tensor(list(Path("soma_lightning/corpora/tinyshakespeare.txt").read_bytes()[: rows * (seq_len + 1)])).view(rows, seq_len + 1)
    targets = text[:, 1:].clone()
    targets[1, -4:] = BYTE_PAD
    return {"tokens": text[:, :-1], "positions": torch.arange(seq_len).expand(rows, seq_len), "targets": targets}


def student(teacher: Path, weight: float = 0.5) -> SomaLM:
    """A tiny student (d_model 16) of a teacher, loaded as a fit would load it."""
    module = SomaLM(spec_from_dict(tiny_v1_arch()), distill=DistillConfig(str(teacher), weight=weight))
    module.on_fit_start()
    return module


@pytest.fixture
def teacher(tmp_path) -> Path:
    """A checkpoint of a larger, other-shaped teacher (d_model 32, 3 layers)."""
    return fresh_checkpoint(tmp_path / "teacher.ckpt", tiny_v1_arch(d_model=32, n_layers=3, hidden_dim=64))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_teacher_is_frozen_and_no_part_of_the_student(teacher):
    module = student(teacher)
    (network,) = module._teacher
    assert not network.training and not any(p.requires_grad for p in network.parameters())
    assert module.state_dict().keys() == SomaLM(spec_from_dict(tiny_v1_arch())).state_dict().keys()
    module.trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False)
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.parameters()} and not in_optimizer & {id(p) for p in network.parameters()}
    module.trainer = None
    module.training_step(batch(), 0).backward()
    assert all(p.grad is None for p in network.parameters())
    assert all(p.grad is not None for p in module.model.encoder.parameters())
    assert module.hparams["distill"] == {"teacher": str(teacher), "weight": 0.5, "temperature": 2.0}


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_weight_zero_is_the_plain_objective(teacher):
    distilled, plain = student(teacher, weight=0.0), SomaLM(spec_from_dict(tiny_v1_arch()))
    plain.load_state_dict(distilled.state_dict())
    losses = []
    for module in (distilled, plain):
        torch.manual_seed(0)
        losses.append(module.training_step(batch(), 0))
        losses[-1].backward()
    assert torch.equal(*losses)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(distilled.parameters(), plain.parameters()))


def test_teacher_of_other_ids_is_refused_in_one_line(tmp_path, capsys):
    from test_prepare_text import bpe_tokenizer

    tokenizer = bpe_tokenizer(tmp_path / "bpe.json")
    subword = fresh_checkpoint(tmp_path / "subword.ckpt", tiny_v1_arch() | {"tokenizer": str(tokenizer), "vocab_size": 512})
    narrow = fresh_checkpoint(tmp_path / "narrow.ckpt", tiny_v1_arch() | {"vocab_size": 258})
    config = str(run_config(tmp_path, "student", 2))
    line = one_error_line(capsys, "fit", "--config", config, "--model.distill.teacher", str(subword))
    assert line.startswith(f"soma-lightning: error: model.distill.teacher: {subword} has the vocabulary ") and "expected a teacher of the student's token ids" in line
    line = one_error_line(capsys, "fit", "--config", config, "--model.distill.teacher", str(narrow))
    assert line.endswith(f"model.distill.teacher: {narrow} has vocab_size 258, expected at least the student's model.arch.vocab_size 264")


def test_fit_and_resume_through_the_cli(tmp_path):
    """A 2-step teacher run; a student of another size distilled from its run directory logs the KL; a resumed
    distilled run (the teacher reloaded from the hyper-parameters) repeats the uninterrupted one; the student
    loads without its teacher."""
    cli_main(["fit", "--config", str(run_config(tmp_path, "teacher", 2))])
    distill = ["--model.arch.d_model", "16", "--model.distill.teacher", str(tmp_path / "runs/teacher/version_0"), "--model.distill.weight", "0.7"]
    cli_main(["fit", "--config", str(run_config(tmp_path, "straight", 4)), *distill])
    interrupted = {"class_path": "conftest.StopAtStep", "init_args": {"step": 2}}
    cli_main(["fit", "--config", str(run_config(tmp_path, "split", 4)), *distill, f"--trainer.callbacks=[{json.dumps(interrupted)}]"])
    cli_main(["fit", "--config", str(run_config(tmp_path, "split", 4)), *distill, "--ckpt_path", "last"])
    straight = tmp_path / "runs/straight/version_0/metrics.csv"
    kl, ce, sigreg, loss = (train_losses(straight, key) for key in ("train/distill_kl", "train/ce", "train/sigreg", "train/loss"))
    assert sorted(kl) == [0, 1, 2, 3] and all(value > 0 for value in kl.values())
    assert loss[0] == pytest.approx(ce[0] + 0.02 * sigreg[0] + 0.7 * kl[0], rel=1e-5)
    assert train_losses(tmp_path / "runs/split/version_0/metrics.csv") == train_losses(straight)
    ckpt = torch.load(tmp_path / "runs/split/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["distill"]["teacher"] == str(tmp_path / "runs/teacher/version_0")
    assert all(key.startswith("model.") for key in ckpt["state_dict"]) and ckpt["global_step"] == 4
    shutil.rmtree(tmp_path / "runs/teacher")
    assert soma_lightning.load(tmp_path / "runs/split/version_0").distill.teacher == str(tmp_path / "runs/teacher/version_0")
