"""SOSM end to end: the tiny spec trains through the CLI, and `soma-lightning graph` shows its graph."""

import json

import pytest

from soma_lightning.cli import main
from conftest import train_tiny_spec


@pytest.mark.slow
def test_tiny_sosm_trains_and_its_graph_can_be_inspected(tmp_path, capsys):
    rows = [r for r in train_tiny_spec("specs/sosm_tiny.yaml", tmp_path) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    assert all(float(r["train/state_aux_loss"]) > 0 for r in rows)

    run = tmp_path / "runs/sosm_tiny/version_0"
    out = tmp_path / "graph.json"
    text = "To be, or not to be, that is the question."
    main(["graph", "--ckpt", str(run), "--text", text, "--json", str(out)])
    positions = json.load(open(out))["positions"]
    assert [p["byte"] for p in positions] == list(text)
    for p in positions:
        assert p["edges"][0] == {"key": p["position"], "byte": p["byte"], "type": "self"}
        assert all(e["key"] <= p["position"] for e in p["edges"])
        for e in p["edges"]:
            if e["type"] == "semantic":
                assert sum(e["blocks"].values()) > 0.3 - 1e-6  # the similarity cleared the spec's threshold
    assert any(e["type"] == "fibonacci" for p in positions for e in p["edges"])

    main(["graph", "--ckpt", str(run), "--text", "to be"])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and printed[4].startswith("    4    'e' <- 4 'e' self; 3 'b' previous")


def test_graph_command_names_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["graph", "--ckpt", str(tmp_path / "nope"), "--text", "x"])
    assert exit.value.code == 2 and "--ckpt: " in capsys.readouterr().err
