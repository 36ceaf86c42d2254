"""Changing tokens after position t leaves logits and representations at t and before unchanged."""

import pytest
import torch

from soma_lightning import build_model
from soma_lightning.spec import REGISTRY
from conftest import tiny_v1_arch


def _assert_causal(model, vocab=264, t=17, length=40):
    model.eval()
    a = torch.randint(0, 256, (2, length))
    b = a.clone()
    b[:, t + 1 :] = torch.randint(0, 256, (2, length - t - 1))
    assert not torch.equal(a, b)
    reps_a, reps_b = model.encode(a), model.encode(b)
    torch.testing.assert_close(reps_a[:, : t + 1], reps_b[:, : t + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.predict(reps_a)[:, : t + 1], model.predict(reps_b)[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(reps_a[:, t + 1 :], reps_b[:, t + 1 :])


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_v1_is_causal(impl):
    _assert_causal(build_model(tiny_v1_arch(impl=impl)))


MIXER_ARGS = {"mha": {"num_heads": 4}}


def test_every_registered_mixer_has_causality_args():
    assert set(REGISTRY["mixer"]) == set(MIXER_ARGS)


@pytest.mark.parametrize("mixer", sorted(REGISTRY["mixer"]))
def test_every_registered_mixer_is_causal(mixer):
    arch = tiny_v1_arch()
    arch["blocks"]["layer"][0]["mixer"] = {"type": mixer, **MIXER_ARGS[mixer]}
    _assert_causal(build_model(arch))
