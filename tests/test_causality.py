"""Changing tokens after position t leaves logits and representations at t and before unchanged: for V1,
for every registered mixer, FFN and input embedding, and for the whole MoE model."""

import pytest
import torch

from soma_lightning import build_model
from soma_lightning.components import REGISTRY
from conftest import tiny_v1_arch


@torch.no_grad()
def _assert_causal(model, t=17, length=40):
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


CASES = {
    "mixer": {
        "mha": [{"num_heads": 4}, {"num_heads": 2, "differential": True}, {"num_heads": 2, "differential": True, "impl": "reference"}],
        "gqa": [
            {"num_heads": 4, "num_kv_heads": 2},
            {"num_heads": 4, "num_kv_heads": 1, "qk_norm": True, "window": 8, "global_stride": 5},
            {"num_heads": 4, "num_kv_heads": 2, "window": 8, "global_stride": 5, "impl": "flex"},
            {"num_heads": 4, "window": 6, "impl": "reference"},
            {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "window": 8, "global_stride": 5, "differential": True},
            {"num_heads": 2, "head_dim": 8, "differential": True, "impl": "reference"},
        ],
        "gated_deltanet": [
            {"num_heads": 2, "num_v_heads": 4, "head_dim": 8},
            {"num_heads": 1, "num_v_heads": 2, "head_dim": 8, "conv_size": 2, "impl": "recurrent"},
        ],
        "graph_attention": [  # reads SOSM's graph
            {"num_heads": 4},
            {"num_heads": 2, "impl": "reference"},
            {"num_heads": 2, "differential": True, "rope_positions": "graph", "landmark_every": 4},
            {"num_heads": 2, "impl": "reference", "differential": True, "rope_positions": "both", "landmark_every": 5, "landmark_buckets": 4},
        ],
        "memory_attention": [{"num_heads": 4, "chunk_size": 8, "top_k": 3}, {"num_heads": 2, "chunk_size": 5, "top_k": 2, "impl": "exact"}],
    },
    "ffn": {
        "gelu_mlp": [{"hidden_dim": 32}],
        "moe": [
            {"hidden_dim": 16, "num_experts": 4, "top_k": 2},
            {"hidden_dim": 16, "num_experts": 4, "top_k": 1, "capacity_factor": 0.5, "balance": "aux_free", "num_shared_experts": 1},
            {"hidden_dim": 16, "num_experts": 4, "top_k": 2, "capacity_factor": 1.0, "impl": "grouped", "activation": "gelu"},
            {"hidden_dim": 16, "num_experts": 4, "top_k": 2, "routing": "expert_choice", "routing_chunk": 8},
            {"hidden_dim": 16, "num_experts": 3, "routing": "soft", "routing_chunk": 5, "slots_per_expert": 2, "num_shared_experts": 1},
        ],
    },
    "embedding": {"hashed_ngram": [{"ngram_sizes": [2, 3], "num_tables": 2, "buckets": 97}], "modality": [{}]},
}


def test_every_registered_component_has_a_causality_case():
    for kind in ("mixer", "ffn", "embedding"):
        assert set(REGISTRY[kind]) == set(CASES[kind]), kind


@pytest.mark.parametrize("kind, name, args", [(k, n, a) for k, names in CASES.items() for n, cases in names.items() for a in cases])
def test_every_registered_component_is_causal(kind, name, args):
    arch = tiny_v1_arch()
    if kind == "embedding":
        arch["input_embeddings"] = [{"type": name, **args}]
        arch["vocab_ranges"] = {"bytes": [0, 128], "high": [128, 256], "specials": [256, 264]}
    else:
        arch["blocks"]["layer"][0 if kind == "mixer" else 1][kind] = {"type": name, **args}
    if name == "graph_attention":
        arch["token_embedding"] = {"type": "semantic_state", "graph": {"top_k": 3, "threshold": 0.0, "chunk_size": 8}}
    _assert_causal(build_model(arch))


def test_moe_model_with_capacity_dropping_is_causal_across_the_batch():
    arch = tiny_v1_arch(n_layers=2)
    arch["blocks"]["layer"][1]["ffn"] = {"type": "moe", "hidden_dim": 16, "num_experts": 4, "top_k": 2, "capacity_factor": 0.3}
    arch["input_embeddings"] = ["hashed_ngram"]
    model = build_model(arch)
    _assert_causal(model)
    assert model.encoder.layers[0].moe.stats["dropped_fraction"] > 0


def test_hybrid_model_with_documents_and_mtp_is_causal():
    from soma_lightning import load_spec

    model = build_model(load_spec("specs/hybrid_tiny.yaml")).eval()
    t, length = 37, 64
    a = torch.randint(0, 256, (2, length))
    b = a.clone()
    b[:, t + 1 :] = torch.randint(0, 256, (2, length - t - 1))
    doc_ids = (torch.arange(length) // 20).expand(2, -1)  # a document starts at 20, 40, 60
    with torch.no_grad():
        (reps_a, mtp_a), (reps_b, mtp_b) = (model.encode_with_mtp(x, doc_ids=doc_ids) for x in (a, b))
    torch.testing.assert_close(reps_a[:, : t + 1], reps_b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(reps_a[:, t + 1 :], reps_b[:, t + 1 :])
    for p, q in zip(mtp_a[:-1], mtp_b[:-1]):  # in-block heads read the stream at <= t
        torch.testing.assert_close(p.representations[:, : t + 1], q.representations[:, : t + 1], rtol=0, atol=1e-6)
    c = a.clone()
    c[:, :20] = torch.randint(0, 256, (2, 20))  # only the first document changes
    with torch.no_grad():
        reps_c = model.encode(c, doc_ids=doc_ids)
    torch.testing.assert_close(reps_a[:, 20:], reps_c[:, 20:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("graph", [{}, {"mutual": True, "adaptive_k": [1, 4], "ema": 0.5, "temporal_gate": 16.0, "threshold": 0.0}])
def test_sosm_model_is_causal(graph):
    """The leak test: the original SOSM's graph let position i see i+1; here every edge points back."""
    from soma_lightning import load_spec

    spec = load_spec("specs/sosm_tiny.yaml")
    spec.token_embedding["graph"] |= graph | {"chunk_size": 16}
    _assert_causal(build_model(spec))


def test_sosm_hybrid_model_is_causal():
    from soma_lightning import load_spec

    _assert_causal(build_model(load_spec("specs/sosm_hybrid_tiny.yaml")))


@pytest.mark.parametrize("embedding", [{"edge_gate": "learned"}, {"block_groups": [["I", "D"], ["R1", "R2", "K"]], "edge_gate": "learned"}])
def test_sosm_model_with_the_semantic_state_options_is_causal(embedding):
    from soma_lightning import load_spec

    spec = load_spec("specs/sosm_tiny.yaml")
    spec.token_embedding |= embedding
    spec.token_embedding["graph"] |= {"chunk_size": 16, "threshold": 0.0}
    _assert_causal(build_model(spec))


def test_low_rank_model_is_causal():
    arch = tiny_v1_arch()
    arch["low_rank"] = {"rank": 4, "include": ["encoder.*", "predictor"]}
    _assert_causal(build_model(arch))
