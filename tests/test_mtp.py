"""Multi-token prediction: heads leave the main path alone, see only what they may, and train."""

import math

import pytest
import torch

from soma_lightning import build_model
from soma_lightning.lm import SomaLM
from soma_lightning.spec import SpecError, spec_from_dict
from conftest import tiny_v1_arch


def _arch(in_block: bool = True, sequential: bool = True) -> dict:
    arch = tiny_v1_arch(n_layers=3)
    if in_block:
        arch["blocks"]["layer"].append({"norm": "rmsnorm", "mtp": {"type": "mtp_heads", "horizons": 3, "loss_weight": 0.2}})
    if sequential:
        arch["mtp"] = {"horizons": 2, "block": "layer" if not in_block else "plain", "loss_weight": 0.3}
        arch["blocks"]["plain"] = tiny_v1_arch()["blocks"]["layer"]
        arch["pattern"] = ["layer"]
    return arch


def test_heads_leave_the_main_representations_unchanged():
    with_heads = build_model(_arch())
    without = build_model(_arch(in_block=False, sequential=False))
    missing, unexpected = without.load_state_dict(with_heads.state_dict(), strict=False)
    assert not missing and unexpected  # only the heads' weights are left over
    tokens = torch.randint(0, 256, (2, 24))
    reps, predictions = with_heads.encode_with_mtp(tokens)
    torch.testing.assert_close(reps, without.encode(tokens), rtol=0, atol=0)
    torch.testing.assert_close(with_heads.encode(tokens), reps, rtol=0, atol=0)
    # 3 layers x 3 in-block horizons, then 2 sequential depths
    assert [p.horizon for p in predictions] == [1, 2, 3] * 3 + [1, 2]
    assert [p.loss_weight for p in predictions] == [0.2] * 9 + [0.3] * 2


@torch.no_grad()
def test_each_prediction_sees_only_the_tokens_it_is_given():
    model = build_model(_arch()).eval()
    t, length = 10, 24
    a = torch.randint(0, 256, (2, length))
    _, base = model.encode_with_mtp(a)
    for changed_from in range(t + 1, t + 4):
        b = a.clone()
        b[:, changed_from:] = (a[:, changed_from:] + 1) % 256
        _, changed = model.encode_with_mtp(b)
        for i, (p, q) in enumerate(zip(base, changed)):
            sequential = i >= 9
            # a parallel head at position t reads tokens <= t; sequential depth k also reads t+1 .. t+k
            sees = t + (p.horizon if sequential else 0)
            same = torch.equal(p.representations[:, : t + 1], q.representations[:, : t + 1])
            assert same == (changed_from > sees), (i, p.horizon, changed_from)


def test_training_loss_adds_each_horizon_with_its_weight():
    torch.manual_seed(0)
    lm = SomaLM(spec_from_dict(_arch()))
    tokens = torch.randint(0, 256, (2, 25))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": torch.arange(24).expand(2, 24)}
    logged = {}
    lm.log_dict = lambda metrics, **kw: logged.update(metrics)
    lm.log = lambda name, value, **kw: logged.update({name: value})
    loss = lm.training_step(batch, 0)
    reps, predictions = lm.model.encode_with_mtp(batch["tokens"])
    expected = 0.0
    for p in predictions:
        logits = lm.model.predict(p.representations[:, : -p.horizon])
        expected += p.loss_weight * torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1 + p.horizon :].flatten())
    main = logged["train/ce"] + lm.sigreg.coefficient * logged["train/sigreg"]
    torch.testing.assert_close(loss, main + expected)
    assert {k for k in logged if k.startswith("train/mtp_")} == {"train/mtp_1_ce", "train/mtp_2_ce", "train/mtp_3_ce"}
    assert all(0 < logged[f"train/mtp_{k}_ce"] < 2 * math.log(264) for k in (1, 2, 3))


@pytest.mark.parametrize(
    "mtp, message",
    [
        ({"horizons": 0, "block": "plain"}, "model.arch.mtp.horizons: must be at least 1"),
        ({"horizons": 1, "block": "nope"}, "model.arch.mtp.block: unknown block 'nope'"),
        ({"horizons": 1, "block": "layer"}, "model.arch.mtp.block: block 'layer' has MTP heads of its own"),
        ({"horizons": 1}, "model.arch.mtp.block: missing key"),
        ({"horizons": 1, "block": "plain", "weight": 1.0}, "model.arch.mtp.weight: unknown key"),
        ({"horizons": "2", "block": "plain"}, "model.arch.mtp.horizons: expected int"),
    ],
)
def test_sequential_mtp_spec_errors_name_the_key(mtp, message):
    arch = _arch()
    arch["mtp"] = mtp
    with pytest.raises(SpecError, match="^" + message.replace("(", r"\(")):
        build_model(arch)


def test_mtp_head_argument_errors_name_the_key():
    arch = _arch(sequential=False)
    arch["blocks"]["layer"][-1]["mtp"]["horizons"] = 0
    with pytest.raises(SpecError, match=r"^model.arch.blocks.layer\[2\].mtp.horizons: must be at least 1"):
        build_model(arch)
