"""K1Attribution on a tiny SomaLM whose gradient is dominated by one parameter of encoder.layers.1.pwff: the path
leads there with the right shares, update mode scales each gradient by its category's factor, analyze mode
changes nothing and logs every N steps."""

import csv
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from soma_lightning.callbacks.attribution import K1Attribution
from soma_lightning.lm import OptimConfig, SomaLM
from soma_lightning.spec import spec_from_dict
from conftest import tiny_v1_arch
from test_nonfinite import loader

CULPRIT = "encoder.layers.1.pwff.linear_outer.weight"
PATH = ["", "encoder.layers.1", "encoder.layers.1.pwff", "encoder.layers.1.pwff.linear_outer", CULPRIT]


def tiny_lm() -> SomaLM:
    return SomaLM(spec_from_dict(tiny_v1_arch()), optim=OptimConfig(lr=1e-2, warmup_steps=1))


def rig_gradients(model: torch.nn.Module) -> None:
    """Small gradients everywhere, a large one on CULPRIT (as if the loss depended on that sublayer only)."""
    for name, p in model.named_parameters():
        p.grad = torch.randn_like(p) * (1.0 if name == CULPRIT else 1e-2)


def grads(lm: SomaLM) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in lm.model.named_parameters()}


class Rig(L.Callback):
    """Before K1Attribution: optionally rigs the gradients, then records them."""

    def __init__(self, rig: bool) -> None:
        self.rig = rig
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: SomaLM, optimizer: torch.optim.Optimizer) -> None:
        if self.rig:
            rig_gradients(pl_module.model)
        self.seen.append(grads(pl_module))


class Record(L.Callback):
    """After K1Attribution: records the gradients the optimizer will see."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: SomaLM, optimizer: torch.optim.Optimizer) -> None:
        self.seen.append(grads(pl_module))


def fit(k1: K1Attribution, tmp_path, max_steps: int, rig: bool) -> tuple[L.Trainer, Rig, Record]:
    before, after = Rig(rig), Record()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=[before, k1, after], logger=CSVLogger(tmp_path, name="k1"),
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(tiny_lm(), loader(n=max_steps))
    return trainer, before, after


def test_path_leads_to_the_culprit_with_its_shares():
    model = tiny_lm().model
    rig_gradients(model)
    path = K1Attribution().attribute(model)
    assert [name for name, _ in path] == PATH

    def squared(prefix: str) -> float:
        return sum(float(p.grad.square().sum()) for name, p in model.named_parameters() if name == prefix or name.startswith(f"{prefix}.") or not prefix)

    expected = [1.0] + [squared(node) / squared(up) for up, node in zip(PATH, PATH[1:])]
    assert [share for _, share in path] == pytest.approx(expected, rel=1e-5)
    assert path[1][1] > 0.99


def category(name: str) -> str:
    if name == CULPRIT:
        return "culprit"
    if name.startswith("encoder.layers.1.pwff.linear_outer."):
        return "parent"
    return "root" if name.startswith("encoder.layers.1.") else "off_path"


def test_update_scales_each_gradient_by_its_category(tmp_path):
    factors = {"culprit": 0.9, "parent": 0.3, "root": 0.2, "off_path": 0.1}
    k1 = K1Attribution(mode="update", every_n_steps=1, **factors)
    _, before, after = fit(k1, tmp_path, max_steps=1, rig=True)
    assert [name for name, _ in k1.last_path] == PATH
    old, new = before.seen[0], after.seen[0]
    assert {category(name) for name in old} == set(factors)
    for name, grad in old.items():
        assert torch.equal(new[name], grad * factors[category(name)]), name


def test_analyze_changes_nothing_and_logs_every_n_steps(tmp_path):
    k1 = K1Attribution(mode="analyze", every_n_steps=2)
    trainer, before, after = fit(k1, tmp_path, max_steps=4, rig=False)
    assert len(before.seen) == len(after.seen) == 4
    for old, new in zip(before.seen, after.seen):
        assert all(torch.equal(old[name], new[name]) for name in old)
    lines = [json.loads(line) for line in open(f"{trainer.log_dir}/k1_attribution.jsonl")]
    assert [line["step"] for line in lines] == [0, 2]
    assert [(n["node"], n["share"]) for n in lines[-1]["path"]] == k1.last_path
    rows = [r for r in csv.DictReader(open(f"{trainer.log_dir}/metrics.csv")) if r.get("k1/share_depth_1")]
    assert [int(r["step"]) for r in rows] == [0, 2]  # written straight to the loggers, on the due steps only
    assert all(float(r["k1/share_depth_1"]) == pytest.approx(line["path"][1]["share"]) for r, line in zip(rows, lines))
    assert all(float(r["k1/culprit_grad_norm"]) > 0 for r in rows)


@pytest.mark.parametrize("args, name", [
    ({"mode": "fix"}, "mode"), ({"every_n_steps": 0}, "every_n_steps"), ({"every_n_steps": 2.0}, "every_n_steps"),
    ({"culprit": -1.0}, "culprit"), ({"parent": float("nan")}, "parent"), ({"root": "0.1"}, "root"), ({"off_path": float("inf")}, "off_path"),
])
def test_bad_arguments_name_the_argument(args, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        K1Attribution(**args)
