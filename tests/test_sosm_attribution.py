"""The DePass decomposition of a SOSM prediction (soma_lightning/decomposition.py): its parts sum to the
centred logit, it equals the plain forward where it must, and `graph --attribution` and DecompositionMonitor
report it."""

import json

import pytest
import torch
import yaml

from soma_lightning import build_model, load_spec
from soma_lightning.cli import main
from soma_lightning.decomposition import decompose, next_token_attribution
from soma_lightning.errors import UserError
from soma_lightning.nn.semantic_graph import EDGE_TYPES, MU_BLOCKS
from soma_lightning.spec import spec_from_dict
from conftest import fresh_checkpoint, train_tiny_spec


def _sosm_arch(**changes) -> dict:
    arch = yaml.safe_load(open("specs/sosm_tiny.yaml"))["model"]["arch"]
    return arch | changes


def _centred(model, tokens, targets):
    logits = model(tokens)
    return logits.gather(-1, targets[..., None])[..., 0] - logits.mean(-1)


ARCHS = {
    "sosm_tiny": _sosm_arch(),
    "rmsnorm_no_bias_all_graph_options": _sosm_arch(
        final_norm="rmsnorm", predictor_bias=False,
        token_embedding={"type": "semantic_state", "graph": {"top_k": 3, "threshold": 0.0, "mutual": True, "adaptive_k": [1, 3], "ema": 0.5, "chunk_size": 8}},
        blocks={"layer": [{"norm": "rmsnorm", "mixer": {"type": "graph_attention", "num_heads": 2}}, {"norm": "rmsnorm", "ffn": {"type": "gelu_mlp", "hidden_dim": 48}}]},
    ),
    "every_graph_attention_option_low_rank": _sosm_arch(
        token_embedding={"type": "semantic_state", "block_attention": True, "block_groups": [["I", "D"], ["R1", "R2", "K"]], "edge_gate": "learned",
                         "graph": {"top_k": 3, "threshold": 0.0, "chunk_size": 16}},
        blocks={"layer": [
            {"norm": "layernorm", "mixer": {"type": "graph_attention", "num_heads": 2, "head_dim": 16, "differential": True, "rope_positions": "both", "landmark_every": 4}},
            {"norm": "layernorm", "ffn": {"type": "gelu_mlp", "hidden_dim": 48}},
        ]},
        low_rank={"rank": 8, "include": ["encoder.layers.*.attention.*", "encoder.layers.*.pwff.*"]},
    ),
}


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("labeling", ["sources", "routes"])
def test_contributions_sum_to_the_centred_logit(name, labeling):
    torch.manual_seed(0)
    model = build_model(spec_from_dict(ARCHS[name])).eval()
    for p in model.parameters():  # away from the init's zeros (temporal table, edge biases)
        p.data += 0.05 * torch.randn_like(p)
    tokens, targets = torch.randint(0, 256, (2, 41)), torch.randint(0, 256, (2, 41))
    d = decompose(model, tokens, targets, labeling)
    with torch.no_grad():
        torch.testing.assert_close(d.logits, _centred(model, tokens, targets), rtol=0, atol=1e-5)
    torch.testing.assert_close(d.contributions.sum(0), d.logits, rtol=0, atol=1e-5)
    if labeling == "sources":
        assert d.labels == [*MU_BLOCKS, "temporal", "bias"]
        assert (d.contributions[: len(MU_BLOCKS)].abs().sum((1, 2)) > 0).all()
    else:
        assert d.labels == ["embedding", *(f"layer {i} {t}" for i in range(2) for t in EDGE_TYPES), "bias"]


def test_a_single_source_model_has_the_whole_logit_in_it():
    """With every MU block but I zeroed in the embedding's projection, and no temporal state, the MU
    contribution is I's alone; and a model whose graph has no Fibonacci edges gives their routes nothing."""
    torch.manual_seed(0)
    arch = _sosm_arch(token_embedding={"type": "semantic_state", "graph": {"top_k": 2, "fibonacci": False, "threshold": 0.0}})
    model = build_model(spec_from_dict(arch)).eval()
    with torch.no_grad():
        model.embedding.proj.weight[:, 4:] = 0
    tokens, targets = torch.randint(0, 256, (1, 30)), torch.randint(0, 256, (1, 30))
    sources, routes = decompose(model, tokens, targets, "sources"), decompose(model, tokens, targets, "routes")
    assert (sources.contributions[1:-1] == 0).all() and sources.contributions[0].abs().sum() > 0
    for label, c in zip(routes.labels, routes.contributions):
        assert (c == 0).all() == label.endswith("fibonacci"), label


def test_models_it_cannot_decompose_are_named():
    model = build_model(load_spec("specs/sosm_hybrid_tiny.yaml")).eval()
    with pytest.raises(UserError, match=r"cannot decompose encoder.layers.0.gdn \(GatedDeltaNet\)"):
        decompose(model, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="eval mode"):
        decompose(model.train(), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_graph_command_prints_and_writes_the_attribution(tmp_path, capsys):
    ckpt = fresh_checkpoint(tmp_path / "sosm.ckpt", _sosm_arch())
    text = "To be, or not to be"
    out = tmp_path / "graph.json"
    main(["graph", "--ckpt", str(ckpt), "--text", text, "--attribution", "--json", str(out)])
    positions = json.load(open(out))["positions"]
    assert [p["attribution"]["target"] for p in positions[:-1]] == list(text[1:])
    for p in positions:
        a = p["attribution"]
        for part in ("sources", "routes", "edge_types"):
            assert abs(sum(a[part].values()) - a["logit"]) < 2e-4, (p["position"], part)
        assert set(a["edge_types"]) == {"embedding", *EDGE_TYPES, "bias"}
    main(["graph", "--ckpt", str(ckpt), "--text", "to be", "--attribution"])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 10 and printed[1].lstrip().startswith("-> 'o' ") and " | embedding " in printed[1]


def test_next_token_attribution_targets_the_next_byte_and_the_last_prediction():
    torch.manual_seed(0)
    model = build_model(spec_from_dict(_sosm_arch())).eval()
    tokens = torch.tensor([list(b"hello")])
    rows = next_token_attribution(model, tokens)
    assert [r["target"] for r in rows[:-1]] == list(b"ello")
    with torch.no_grad():
        assert rows[-1]["target"] == int(model(tokens)[0, -1].argmax())


def test_monitor_logs_contributions_that_sum_to_the_logit(tmp_path):
    callbacks = [{"class_path": "soma_lightning.callbacks.DecompositionMonitor", "init_args": {"every_n_steps": 2, "rows": 2}}]
    rows = train_tiny_spec("specs/sosm_tiny.yaml", tmp_path, steps=4, callbacks=callbacks)
    logged = [r for r in rows if r.get("decomp/logit")]
    assert [int(r["step"]) for r in logged] == [0, 2]
    for r in logged:
        sources = sum(float(r[f"decomp/source_{b}"]) for b in [*MU_BLOCKS, "temporal", "bias"])
        edges = sum(float(r[f"decomp/edge_{t}"]) for t in ["embedding", *EDGE_TYPES, "bias"])
        assert abs(sources - float(r["decomp/logit"])) < 1e-4 and abs(edges - float(r["decomp/logit"])) < 1e-4
    lines = [json.loads(line) for line in open(tmp_path / "runs/sosm_tiny/version_0/decomposition.jsonl")]
    assert [line["step"] for line in lines] == [0, 2] and "layer 1 semantic" in lines[0]["routes"]


def test_monitor_warns_once_and_records_nothing_for_a_model_it_cannot_decompose():
    from types import SimpleNamespace

    from soma_lightning.callbacks import DecompositionMonitor

    monitor = DecompositionMonitor(every_n_steps=1)
    module = SimpleNamespace(model=build_model(load_spec("specs/sosm_hybrid_tiny.yaml")).train())
    with pytest.warns(UserWarning, match=r"DecompositionMonitor: records nothing: attribution: cannot decompose encoder.layers.0.gdn"):
        monitor.on_fit_start(None, module)
    assert not monitor.enabled and module.model.training
    monitor.step = 0
    monitor.on_train_batch_end(None, module, None, None, 0)  # would fail on the None batch if it ran
