import math

import pytest
import torch
import torch.nn.functional as F

from soma_lightning.nn.semantic_graph import (
    BLOCK_DIM,
    MU_BLOCKS,
    GraphConfig,
    build_graph,
    causal_ema,
    dense_adjacency,
    dense_topk_reference,
)

FEATURES = {
    "plain": {},
    "no_threshold": {"threshold": -math.inf},
    "no_fibonacci": {"fibonacci": False},
    "projection": {"projection_dim": 7},
    "temporal_gate": {"temporal_gate": 20.0, "threshold": 0.1},
    "ema": {"ema": 0.7},
    # Weights above 1 sharpen the softmax (temperature 1), so that the adaptive K spreads over 1..8.
    "adaptive_k": {"adaptive_k": (1, 8), "threshold": -math.inf, "blocks": {"I": 8.0, "K": 4.0}},
    "mutual": {"mutual": True, "threshold": 0.0},
    "all": {
        "ema": 0.5,
        "projection_dim": 6,
        "temporal_gate": 40.0,
        "adaptive_k": (2, 6),
        "mutual": True,
        "threshold": 0.05,
        "blocks": {"I": 8.0, "K": 4.0},
    },
}


def _state(b: int, t: int) -> torch.Tensor:
    return torch.randn(b, t, len(MU_BLOCKS) * BLOCK_DIM, dtype=torch.float64)  # float64: no near-ties between paths


def _with_block(vectors: list[list[float]], name: str = "I") -> torch.Tensor:
    """[1, T, 64] state: block `name` of position t is vectors[t], the other blocks random."""
    state = _state(1, len(vectors))
    start = MU_BLOCKS.index(name) * BLOCK_DIM
    state[0, :, start : start + BLOCK_DIM] = torch.tensor(vectors, dtype=torch.float64)
    return state


def _semantic_counts(graph, cfg: GraphConfig) -> torch.Tensor:
    return (graph.neighbors[..., -cfg.top_k :] >= 0).sum(-1)


def _assert_same(a, b) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_edges_are_causal_and_typed():
    cfg = GraphConfig(chunk_size=16, threshold=0.0)
    t = 60
    graph = build_graph(_state(3, t), cfg)
    fib = [2, 3, 5, 8, 13, 21, 34, 55]
    assert graph.neighbors.shape == (3, t, 2 + len(fib) + cfg.top_k)
    i = torch.arange(t)[:, None]
    nb, types = graph.neighbors, graph.edge_type
    assert (nb <= i).all() and ((nb >= 0) == (types >= 0)).all()
    assert (nb[..., 0] == torch.arange(t)).all() and (types[..., 0] == 0).all()
    assert (nb[..., 1] == (torch.arange(t) - 1).clamp(min=-1)).all() and (types[:, 1:, 1] == 1).all()
    assert (nb[..., 2 : 2 + len(fib)] == (i - torch.tensor(fib)).clamp(min=-1)).all()
    semantic = nb[..., 2 + len(fib) :]
    distance = (i - semantic)[semantic >= 0]
    assert (distance >= 2).all() and not torch.isin(distance, torch.tensor(fib)).any()
    assert (types[..., 2 + len(fib) :][semantic >= 0] == 3).all() and (semantic >= 0).any()
    assert (nb >= 0).sum().item() == dense_adjacency(graph, t).sum().item()  # edges are distinct
    assert not dense_adjacency(graph, t).triu(1).any()
    assert build_graph(_state(1, t), GraphConfig(max_fibonacci=3)).neighbors.shape[-1] == 2 + 3 + 8
    assert build_graph(_state(1, t), GraphConfig(fibonacci=False)).neighbors.shape[-1] == 2 + 8


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("t, chunk_size", [(50, 16), (203, 37), (300, 64)])
def test_streaming_equals_dense_reference(features, t, chunk_size):
    cfg = GraphConfig(chunk_size=chunk_size, **features)
    state = _state(3, t)
    _assert_same(build_graph(state, cfg), dense_topk_reference(state, cfg))


def test_short_sequences_and_float32():
    cfg = GraphConfig(top_k=4, chunk_size=2, threshold=-math.inf, fibonacci=False)
    for t in (1, 2, 3, 5):
        state = _state(2, t)
        graph = build_graph(state, cfg)
        _assert_same(graph, dense_topk_reference(state, cfg))
        assert (_semantic_counts(graph, cfg) == (torch.arange(t) - 1).clamp(0, 4)).all()
    assert build_graph(_state(2, 9).float(), cfg).provenance.dtype == torch.float32


def test_mutual_drops_one_sided_edge_and_keeps_mutual_one():
    # 4's best candidate is 0, but 2 is closer to 0 than 4 is: 4 -> 0 is one-sided; 2 -> 0 is mutual.
    e1, e2, e3, e4 = torch.eye(4, dtype=torch.float64).tolist()
    near_e1 = F.normalize(torch.tensor([1.0, 0, 0.1, 0]), dim=0).tolist()
    diagonal = F.normalize(torch.tensor([1.0, 1.0, 0, 0]), dim=0).tolist()
    state = _with_block([e1, e3, near_e1, e4, diagonal, e2])
    one_sided = GraphConfig(top_k=1, blocks={"I": 1.0}, fibonacci=False)
    mutual = GraphConfig(top_k=1, blocks={"I": 1.0}, fibonacci=False, mutual=True)
    assert build_graph(state, one_sided).neighbors[0, :, -1].tolist() == [-1, -1, 0, -1, 0, -1]
    assert build_graph(state, mutual).neighbors[0, :, -1].tolist() == [-1, -1, 0, -1, -1, -1]

    state = _state(2, 120)
    cfg = GraphConfig(chunk_size=32, threshold=0.0)
    kept = dense_adjacency(build_graph(state, GraphConfig(chunk_size=32, threshold=0.0, mutual=True)), 120)
    full = dense_adjacency(build_graph(state, cfg), 120)
    assert (full | kept).equal(full) and kept.sum() < full.sum()


def test_adaptive_k_rises_with_entropy():
    v = [1.0, 0, 0, 0]
    w = [-1.0, 0, 0, 0]
    t = 20
    # Last query's candidates are positions 0..17: one equal to it (peaked), half (medium), all (flat).
    peaked = [v] + [w] * (t - 2) + [v]
    medium = [v if p % 2 == 0 else w for p in range(t - 1)] + [v]
    flat = [v] * t
    state = torch.cat([_with_block(rows) for rows in (peaked, medium, flat)])
    # Weight 8 sharpens the softmax (temperature 1) enough to make the peaked row near one-hot.
    cfg = GraphConfig(top_k=8, blocks={"I": 8.0}, fibonacci=False, threshold=-math.inf, adaptive_k=(2, 8), chunk_size=8)
    counts = _semantic_counts(build_graph(state, cfg), cfg)[:, -1].tolist()
    assert counts[0] == 2 and counts[0] < counts[1] < counts[2] and counts[2] == 8


def test_each_batch_row_gets_its_own_graph():
    cfg = GraphConfig(chunk_size=16, threshold=0.1, mutual=True, adaptive_k=(2, 8))
    state = _state(4, 70)
    graph = build_graph(state, cfg)
    perm = torch.tensor([2, 0, 3, 1])
    _assert_same(build_graph(state[perm], cfg), [x[perm] for x in graph])
    for b in range(4):
        _assert_same(build_graph(state[b : b + 1], cfg), [x[b : b + 1] for x in graph])
    assert not graph.neighbors[0].equal(graph.neighbors[1])


@pytest.mark.parametrize("features", [FEATURES["plain"], FEATURES["all"]], ids=["plain", "all"])
def test_future_state_does_not_change_past_rows(features):
    cfg = GraphConfig(chunk_size=16, **features)
    state = _state(2, 90)
    changed = state.clone()
    changed[:, 41:] = _state(2, 49)
    before, after = build_graph(state, cfg), build_graph(changed, cfg)
    _assert_same([x[:, :41] for x in before], [x[:, :41] for x in after])
    assert not before.neighbors[:, 41:].equal(after.neighbors[:, 41:])


@pytest.mark.parametrize("features", [FEATURES["plain"], FEATURES["projection"]], ids=["plain", "projection"])
def test_provenance_sums_to_block_weighted_similarity(features):
    cfg = GraphConfig(chunk_size=16, **features)
    state = _state(2, 80)
    graph = build_graph(state, cfg)
    semantic = graph.edge_type == 3
    rows = torch.arange(2)[:, None, None]
    blocks = state.unflatten(-1, (len(MU_BLOCKS), BLOCK_DIM))
    neighbors = blocks[rows, graph.neighbors.clamp(min=0)]  # [B, T, E, 16, 4]
    similarity = sum(
        w * F.cosine_similarity(blocks[:, :, None, MU_BLOCKS.index(name)], neighbors[..., MU_BLOCKS.index(name), :], dim=-1)
        for name, w in cfg.blocks.items()
    )
    torch.testing.assert_close(graph.provenance.sum(-1)[semantic], similarity[semantic])
    assert (graph.provenance[~semantic] == 0).all() and semantic.any()
    if cfg.projection_dim is None:
        assert (similarity[semantic] > cfg.threshold).all()


def test_causal_ema_matches_recurrence():
    x = torch.randn(2, 23, 5, dtype=torch.float64)
    s, expected = torch.zeros(2, 5, dtype=torch.float64), []
    for t in range(23):
        s = 0.8 * s + 0.2 * x[:, t]
        expected.append(s)
    torch.testing.assert_close(causal_ema(x, 0.8, 6), torch.stack(expected, dim=1))


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k", 0),
        ("threshold", math.nan),
        ("blocks", {"Q": 1.0}),
        ("blocks", {}),
        ("blocks", {"I": 0.0}),
        ("max_fibonacci", 0),
        ("adaptive_k", (5, 3)),
        ("adaptive_k", (2, 9)),
        ("projection_dim", 0),
        ("projection_dim", 13),
        ("temporal_gate", 0.0),
        ("ema", 1.0),
        ("chunk_size", 0),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        GraphConfig(**{field: value})


def test_bad_inputs_name_the_argument():
    cfg = GraphConfig()
    with pytest.raises(ValueError, match="^state:"):
        build_graph(torch.randn(2, 5, 63), cfg)
    with pytest.raises(ValueError, match="^t:"):
        dense_adjacency(build_graph(torch.randn(2, 5, 64), cfg), 6)
