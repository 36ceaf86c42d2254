"""specs/sosm_hybrid_tiny.yaml: Gated DeltaNet layers with graph attention over the semantic state trains
through the CLI on the CPU (its causality and cached decoding: test_causality.py, test_generate.py)."""

import pytest

from conftest import train_tiny_spec


@pytest.mark.slow
def test_tiny_sosm_hybrid_trains(tmp_path):
    rows = [r for r in train_tiny_spec("specs/sosm_hybrid_tiny.yaml", tmp_path, steps=30) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert all(float(r["train/state_aux_loss"]) > 0 for r in rows)
