"""SOSM's research options: differential attention (mha, gqa, graph_attention), graph RoPE and the landmark
distance bias (graph_distance.py), the learned temporal edge gate and block group heads of the semantic
state, and low-rank Linear layers. Each fast form against its plain reference, causality, gradients, and
cached decoding against the full forward pass."""

import math

import pytest
import torch
import yaml

from soma_lightning import build_model
from soma_lightning.errors import SpecError
from soma_lightning.nn.attention import MultiHeadAttention
from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import DecodeState
from soma_lightning.nn.differential import lambda_init_schedule
from soma_lightning.nn.gqa import GroupedQueryAttention
from soma_lightning.nn.graph_attention import GraphAttention
from soma_lightning.nn.graph_distance import depth_reference, graph_depth, hops_reference, landmark_distance, landmark_hops
from soma_lightning.nn.low_rank import LowRankLinear
from soma_lightning.nn.ops.attention.differential import differential_attention, differential_attention_reference
from soma_lightning.nn.ops.attention.reference import masked_attention_reference
from soma_lightning.nn.semantic_graph import GraphConfig, SemanticGraph, build_graph
from soma_lightning.nn.semantic_state import SemanticStateEmbedding
from soma_lightning.spec import spec_from_dict
from conftest import tiny_v1_arch
from test_causality import _assert_causal
from test_sosm_layers import random_graph


def _ctx(b: int, t: int, graph=None) -> SequenceContext:
    return SequenceContext(positions=torch.arange(t).expand(b, -1), semantic_graph=graph)


def _graph(b: int, t: int) -> SemanticGraph:
    return SemanticGraph(*random_graph(b, t))


def _perturb(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every parameter off its initial value (zero tables, unit norms) so that each one matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _outputs_and_grads(module, x, ctx_fn):
    y = module(x, ctx_fn())
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    return y, torch.autograd.grad((y * cotangent).sum(), [x, *module.parameters()])


def _assert_fast_equals_reference(module, fast: str, x, ctx_fn):
    module.impl = "reference"
    want, want_grads = _outputs_and_grads(module, x, ctx_fn)
    module.impl = fast
    got, got_grads = _outputs_and_grads(module, x, ctx_fn)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):  # weight gradients sum over every position: a little more rounding
        torch.testing.assert_close(g, w, rtol=5e-5, atol=1e-5)


# ---------------------------------------------------------------- differential attention


def test_differential_op_equals_the_dense_maps():
    b, h, t, hd = 2, 3, 11, 8
    q, k, v = torch.randn(b, h, t, hd), torch.randn(b, h, t, hd), torch.randn(b, h, t, 12)
    mask = torch.rand(b, 1, t, t) > 0.3
    bias, lam = torch.randn(b, h, t, t), torch.tensor(0.37)
    fast = differential_attention(lambda qh, kh: masked_attention_reference(qh, kh, v, mask, bias), q, k, lam)
    torch.testing.assert_close(fast, differential_attention_reference(q, k, v, lam, mask, bias), rtol=1e-5, atol=1e-5)
    plain = masked_attention_reference(q[..., :4], k[..., :4], v, mask, bias)
    torch.testing.assert_close(differential_attention_reference(q, k, v, torch.tensor(0.0), mask, bias), plain, rtol=1e-5, atol=1e-5)


def test_lambda_init_schedule_and_the_initial_lambda():
    assert lambda_init_schedule(1) == pytest.approx(0.2)
    assert lambda_init_schedule(12) == pytest.approx(0.8 - 0.6 * math.exp(-3.3))
    attn = MultiHeadAttention(16, 2, differential=True, lambda_init=0.5)
    d = attn.differential
    want = math.exp((d.lambda_q1 * d.lambda_k1).sum().item()) - math.exp((d.lambda_q2 * d.lambda_k2).sum().item()) + 0.5
    assert d.lam().item() == pytest.approx(want)


@pytest.mark.parametrize("impl", ["sdpa"])
def test_mha_differential_equals_its_reference(impl):
    attn = MultiHeadAttention(16, 2, differential=True)
    _perturb(attn)
    x = torch.randn(2, 13, 16, requires_grad=True)
    _assert_fast_equals_reference(attn, impl, x, lambda: _ctx(2, 13))


@pytest.mark.parametrize("pattern", [{}, {"window": 5, "global_stride": 4}])
def test_gqa_differential_equals_its_reference(pattern):
    attn = GroupedQueryAttention(24, num_heads=4, num_kv_heads=2, head_dim=8, differential=True, **pattern)
    _perturb(attn)
    x = torch.randn(2, 17, 24, requires_grad=True)
    _assert_fast_equals_reference(attn, "sdpa", x, lambda: _ctx(2, 17))


def test_graph_attention_differential_equals_its_reference_and_flex_forward():
    attn = GraphAttention(24, 3, differential=True)
    _perturb(attn)
    graph = _graph(2, 40)
    x = torch.randn(2, 40, 24, requires_grad=True)
    _assert_fast_equals_reference(attn, "gather", x, lambda: _ctx(2, 40, graph))
    want = attn(x, _ctx(2, 40, graph))
    attn.impl = "flex"  # forward only: FlexAttention has no backward on CPU
    with torch.no_grad():
        torch.testing.assert_close(attn(x, _ctx(2, 40, graph)), want, rtol=1e-5, atol=1e-5)


def test_differential_parameters_learn_and_change_the_output():
    attn = MultiHeadAttention(16, 2, differential=True)
    x = torch.randn(2, 9, 16)
    y = attn(x, _ctx(2, 9))
    y.pow(2).sum().backward()
    d = attn.differential
    for p in (d.lambda_q1, d.lambda_k1, d.lambda_q2, d.lambda_k2, d.norm.weight, attn.query.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    plain = MultiHeadAttention(16, 2)
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("differential")})
    assert not torch.allclose(plain(x, _ctx(2, 9)), y)
    assert attn.flops_per_token(9) - plain.flops_per_token(9) == pytest.approx(2 * 16 * 5)  # a second AV


def test_differential_needs_a_head_dim_divisible_by_4():
    for make in (lambda: MultiHeadAttention(12, 2, differential=True), lambda: GraphAttention(24, 4, differential=True)):
        with pytest.raises(ValueError, match="^differential: needs a head dim divisible by 4"):
            make()
    with pytest.raises(ValueError, match="^lambda_init: "):
        GroupedQueryAttention(16, 2, differential=True, lambda_init=1.5)


@pytest.mark.parametrize(
    "mixer",
    [
        {"type": "mha", "num_heads": 2, "differential": True},
        {"type": "gqa", "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "differential": True, "window": 12, "global_stride": 5},
    ],
)
@torch.no_grad()
def test_differential_cached_decoding_equals_the_full_forward(mixer):
    arch = tiny_v1_arch()
    arch["blocks"]["layer"][0]["mixer"] = mixer
    model = build_model(arch).eval()
    _perturb(model, 0.05)
    tokens = torch.randint(0, 256, (2, 40))
    full = model(tokens)
    state = DecodeState(record_attention=True)
    for a, b in [(0, 17), (17, 30)] + [(t, t + 1) for t in range(30, 40)]:
        reps, _ = model.extend(tokens[:, a:b], state)
        torch.testing.assert_close(model.predict(reps), full[:, a:b], rtol=1e-5, atol=1e-5)
    layer = model.encoder.layers[0].attention
    lam = layer.differential.lam()
    weights = state.attention[layer]
    torch.testing.assert_close(weights.sum(-1), torch.full_like(weights[..., 0], 1 - lam.item()))  # A1 - lambda A2 is recorded


# ---------------------------------------------------------------- graph distances


@pytest.mark.parametrize("t, every, cap", [(50, 7, 5), (33, 1, 3), (64, 16, 15)])
def test_hop_distances_equal_breadth_first_search(t, every, cap):
    neighbors = random_graph(3, t).neighbors
    assert torch.equal(graph_depth(neighbors), depth_reference(neighbors))
    assert torch.equal(landmark_hops(neighbors, every, cap), hops_reference(neighbors, every, cap))


def test_hop_distances_continue_from_the_past_and_are_causal():
    neighbors = random_graph(2, 60).neighbors
    depth, hops = graph_depth(neighbors), landmark_hops(neighbors, 8, 6)
    past_depth = past_hops = None
    for a, b in [(0, 1), (1, 19), (19, 20), (20, 45), (45, 60)]:
        past_depth, past_hops = graph_depth(neighbors[:, a:b], past_depth), landmark_hops(neighbors[:, a:b], 8, 6, past_hops)
        assert torch.equal(past_depth, depth[:, :b]) and torch.equal(past_hops, hops[:, :b, : past_hops.shape[2]])
    changed = neighbors.clone()
    changed[:, 30:, 1:] = random_graph(2, 60).neighbors[:, 30:, 1:]  # other edges after position 29
    assert torch.equal(graph_depth(changed)[:, :30], depth[:, :30])
    assert torch.equal(landmark_hops(changed, 8, 6)[:, :30], hops[:, :30])


def test_landmark_distance_is_the_landmark_estimate():
    neighbors = random_graph(2, 40).neighbors
    every, cap = 6, 7
    hops = hops_reference(neighbors, every, cap)
    got = landmark_distance(landmark_hops(neighbors, every, cap), neighbors, cap)
    for b in range(2):
        for i in range(40):
            for s, j in enumerate(neighbors[b, i].tolist()):
                if j < 0 or j == i:
                    assert got[b, i, s] == 0
                else:
                    assert got[b, i, s] == min(cap, min(hops[b, i, m] + hops[b, j, m] for m in range(hops.shape[2])))
                    if j % every == 0:  # an edge to a landmark: the exact hop distance (1)
                        assert got[b, i, s] == 1


def test_depth_of_a_built_graph_is_its_shortest_way_back():
    graph = build_graph(torch.randn(1, 200, 64), GraphConfig(top_k=4, threshold=0.0, chunk_size=64))
    depth = graph_depth(graph.neighbors)[0]
    assert depth[0] == 0 and (depth[1:] >= 1).all() and depth.max() <= 6  # Fibonacci shortcuts: few hops back
    assert torch.equal(depth[None], depth_reference(graph.neighbors))


@pytest.mark.parametrize(
    "options", [{"rope_positions": "graph"}, {"rope_positions": "both", "landmark_every": 5, "landmark_buckets": 4}, {"landmark_every": 3, "differential": True}]
)
def test_graph_rope_and_landmark_bias_gather_equals_reference(options):
    attn = GraphAttention(24, 3, **({"head_dim": 8} | options))
    _perturb(attn)
    graph = _graph(2, 40)
    x = torch.randn(2, 40, 24, requires_grad=True)
    _assert_fast_equals_reference(attn, "gather", x, lambda: _ctx(2, 40, graph))
    token = GraphAttention(24, 3, **({"head_dim": 8} | options | {"rope_positions": "token"}))
    token.load_state_dict(attn.state_dict())
    if options.get("rope_positions", "token") != "token":
        assert not torch.allclose(token(x, _ctx(2, 40, graph)), attn(x, _ctx(2, 40, graph)))


def test_landmark_bias_learns_and_is_shared_through_the_context():
    attn = GraphAttention(24, 3, landmark_every=4, rope_positions="graph")
    ctx = _ctx(2, 40, _graph(2, 40))
    attn.prepare_context(ctx)
    assert set(ctx.semantic_graph.distances) == {"depth", ("landmark_hops", 4, 15)}
    attn(torch.randn(2, 40, 24), ctx).pow(2).sum().backward()
    assert attn.landmark_bias.grad is not None and attn.landmark_bias.grad.abs().sum() > 0


def test_graph_options_refuse_bad_values():
    cases = [({"rope_positions": "depth"}, "rope_positions"), ({"landmark_every": 0}, "landmark_every"), ({"landmark_buckets": 1}, "landmark_buckets"),
             ({"landmark_every": 4, "impl": "flex"}, "landmark_every")]
    for args, name in cases:
        with pytest.raises(ValueError, match=f"^{name}: "):
            GraphAttention(24, 3, **args)


# ---------------------------------------------------------------- the semantic state's options


def test_learned_edge_gate_starts_neutral_and_learns():
    torch.manual_seed(0)
    gated = SemanticStateEmbedding(32, 50, edge_gate="learned", graph={"threshold": 0.0, "top_k": 3})
    plain = SemanticStateEmbedding(32, 50, graph={"threshold": 0.0, "top_k": 3})
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("edge_gate")})
    attn = GraphAttention(32, 4)
    _perturb(attn)
    tokens = torch.randint(0, 50, (2, 30))
    outputs = []
    for emb in (plain, gated):
        ctx = _ctx(2, 30)
        x = emb(tokens, ctx)
        outputs.append(attn(x, ctx))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)  # a gate equal on all of a query's edges cancels
    outputs[1].pow(2).sum().backward()
    assert gated.edge_gate.weight.grad.abs().sum() > 0 and gated.edge_gate.weight.grad[0, -1] != 0  # the lag feature
    with torch.no_grad():
        gated.edge_gate.weight[0, -1] = -2.0  # penalise long edges
        ctx = _ctx(2, 30)
        assert not torch.allclose(attn(gated(tokens, ctx), ctx), outputs[0])


def test_block_groups_of_one_block_equal_the_per_block_heads():
    per_block = SemanticStateEmbedding(32, 50, block_attention=True)
    grouped = SemanticStateEmbedding(32, 50, block_attention=True, block_groups=[])
    state = {k: v for k, v in per_block.state_dict().items() if k != "block_qkv"}
    state |= {f"group_qkv.{n}": per_block.block_qkv[n] for n in range(16)}
    grouped.load_state_dict(state)
    tokens = torch.randint(0, 50, (2, 20))
    torch.testing.assert_close(grouped.embed(tokens)[1], per_block.embed(tokens)[1], rtol=1e-5, atol=1e-5)


def test_block_groups_mix_within_a_group_causally():
    emb = SemanticStateEmbedding(32, 50, block_attention=True, block_groups=[["I", "D"], ["R1", "R2", "K"]]).eval()
    assert emb.block_heads[:2] == [[0, 1], [2, 3, 4]] and len(emb.block_heads) == 13
    assert [p.shape for p in emb.group_qkv[:3]] == [(8, 24), (12, 36), (4, 12)]
    tokens = torch.randint(0, 50, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 50
    with torch.no_grad():
        (_, mu), (_, mu2) = emb.embed(tokens), emb.embed(changed)
    torch.testing.assert_close(mu[:, :12], mu2[:, :12])
    _, mu = emb.embed(tokens)
    mu[..., 4:8].sum().backward()  # block D reads block I through their shared head
    assert emb.group_qkv[0].grad[:4].abs().sum() > 0 and emb.group_qkv[1].grad.abs().sum() == 0


def test_semantic_state_options_refuse_bad_values():
    cases = [({"block_groups": [["I"]]}, "block_groups"), ({"block_attention": True, "block_groups": [["I", "Q"]]}, "block_groups"),
             ({"block_attention": True, "block_groups": [["I"], ["I"]]}, "block_groups"), ({"edge_gate": "decay"}, "edge_gate")]
    for args, name in cases:
        with pytest.raises(ValueError, match=f"^{name}: "):
            SemanticStateEmbedding(32, 50, **args)


def _sosm_features_spec():
    raw = yaml.safe_load(open("specs/sosm_tiny.yaml"))["model"]["arch"]
    raw["token_embedding"] |= {"edge_gate": "learned", "block_groups": [["I", "D"], ["R1", "R2", "K"]]}
    raw["token_embedding"]["graph"] |= {"chunk_size": 8, "threshold": 0.0}
    raw["blocks"]["layer"][0]["mixer"] |= {"differential": True, "head_dim": 8, "rope_positions": "both", "landmark_every": 8, "landmark_buckets": 6}
    return spec_from_dict(raw)


@torch.no_grad()
def test_sosm_with_every_option_decodes_as_the_full_forward_and_rolls_back():
    model = build_model(_sosm_features_spec()).eval()
    _perturb(model, 0.05)
    tokens = torch.randint(0, 256, (2, 50))
    full = model(tokens)
    state = DecodeState(keep_steps=True)
    for a, b in [(0, 19), (19, 33), (33, 38)] + [(t, t + 1) for t in range(38, 41)]:
        reps, _ = model.extend(tokens[:, a:b], state)
        torch.testing.assert_close(model.predict(reps), full[:, a:b], rtol=1e-5, atol=1e-5)
    model.extend(torch.randint(0, 256, (2, 5)), state)  # rejected drafts, across landmark 48
    state.rollback(41)
    reps, _ = model.extend(tokens[:, 41:50], state)
    torch.testing.assert_close(model.predict(reps), full[:, 41:50], rtol=1e-5, atol=1e-5)


def test_sosm_with_every_option_is_causal_and_trains():
    model = build_model(_sosm_features_spec())
    _assert_causal(model)
    model.train()
    tokens = torch.randint(0, 256, (2, 32))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    attention = model.encoder.layers[0].attention
    for p in (attention.landmark_bias, attention.differential.lambda_q1, model.embedding.edge_gate.weight, model.embedding.group_qkv[0]):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------- low-rank Linear layers


def _low_rank_arch(**low_rank):
    arch = tiny_v1_arch(d_model=32)
    arch["low_rank"] = low_rank
    return arch


def test_low_rank_replaces_the_matching_linear_layers_and_counts_their_parameters():
    full = build_model(tiny_v1_arch(d_model=32))
    model = build_model(_low_rank_arch(rank=4, include=["encoder.layers.*.attention.*", "encoder.layers.1.pwff.linear_inner"]))
    replaced = [name for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert len(replaced) == 2 * 4 + 1 and "encoder.layers.1.pwff.linear_inner" in replaced
    inner = model.get_submodule("encoder.layers.1.pwff.linear_inner")
    saved = 8 * (32 * 32 - 4 * 64) + (32 * 32 - 4 * (32 + 32))
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in model.parameters()) == saved
    assert inner.down.weight.shape == (4, 32) and inner.up.bias.shape == (32,)
    attention = model.encoder.layers[0].attention
    assert attention.flops_per_token(8) == 4 * 2 * 4 * 64 + 4 * 32 * 4.5


def test_low_rank_model_trains_and_stays_causal():
    torch.manual_seed(0)
    model = build_model(_low_rank_arch(rank=4, include=["encoder.*", "predictor"]))
    _assert_causal(model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    tokens = torch.randint(0, 256, (4, 24))
    losses = []
    for _ in range(15):
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize(
    "low_rank, message",
    [
        ({"rank": 4}, r"model.arch.low_rank.include: missing key"),
        ({"rank": 0, "include": ["*"]}, r"model.arch.low_rank.rank: must be at least 1"),
        ({"rank": 2, "include": ["encoder.nothing.*"]}, r"model.arch.low_rank.include: no nn.Linear module matches"),
        ({"rank": 2, "include": ["*"], "alpha": 1}, r"model.arch.low_rank.alpha: unknown key"),
        ({"rank": 2, "include": "encoder.*"}, r"model.arch.low_rank.include: expected list"),
    ],
)
def test_low_rank_spec_errors_name_the_key(low_rank, message):
    with pytest.raises(SpecError, match=message):
        build_model(_low_rank_arch(**low_rank))
