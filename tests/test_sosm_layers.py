from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.graph_attention import GraphAttention
from soma_lightning.nn.semantic_state import SemanticStateEmbedding, mu_blocks


class Graph(NamedTuple):
    """The fields of semantic_graph.SemanticGraph."""

    neighbors: Tensor
    edge_type: Tensor
    provenance: Tensor


def random_graph(b: int, t: int, e: int = 6) -> Graph:
    """Slot 0 the self edge; the other slots distinct random earlier positions, about a third left empty."""
    idx = torch.arange(t)
    earlier = torch.rand(b, t, t).masked_fill(idx[None, :] >= idx[:, None], -1.0)
    score, position = earlier.topk(e - 1, dim=-1)
    keep = (score >= 0) & (torch.rand(b, t, e - 1) > 0.3)
    neighbors = torch.cat([idx[:, None].expand(b, t, 1), position.masked_fill(~keep, -1)], dim=-1)
    edge_type = torch.cat([torch.zeros(b, t, 1, dtype=torch.long), torch.randint(1, 4, (b, t, e - 1)).masked_fill(~keep, -1)], dim=-1)
    return Graph(neighbors, edge_type, torch.zeros(b, t, e, 16))


def graph_ctx(graph: Graph) -> SequenceContext:
    b, t, _ = graph.neighbors.shape
    return SequenceContext(positions=torch.arange(t, device=graph.neighbors.device).expand(b, -1), semantic_graph=graph)


def attention(d_model: int = 24, num_heads: int = 3, **kwargs) -> GraphAttention:
    attn = GraphAttention(d_model, num_heads, **kwargs)
    with torch.no_grad():
        attn.edge_bias.normal_()
    return attn


@pytest.mark.parametrize("b, t, heads", [(2, 40, 2), (3, 100, 4), (2, 70, 3)])
def test_gather_and_flex_equal_the_dense_reference(b, t, heads):
    attn, graph = attention(num_heads=heads), random_graph(b, t)
    x = torch.randn(b, t, 24, requires_grad=True)
    outputs, grads = {}, {}
    for impl in ("reference", "gather"):
        attn.impl = impl
        outputs[impl] = attn(x, graph_ctx(graph))
        grads[impl] = torch.autograd.grad(outputs[impl].pow(2).sum(), [x, *attn.parameters()])
    torch.testing.assert_close(outputs["gather"], outputs["reference"], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads["gather"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    attn.impl = "flex"  # forward only: FlexAttention has no backward on CPU
    with torch.no_grad():
        torch.testing.assert_close(attn(x, graph_ctx(graph)), outputs["reference"], rtol=1e-5, atol=1e-5)


def test_slot_gather_equals_torch_gather_with_repeated_rows_values_and_gradients():
    """The opaque op graph attention gathers keys and values with: PyTorch's gather and its backward, eagerly, as
    torch.library's checks of a custom op (fake tensors, autograd registration) and under torch.compile."""
    from soma_lightning.nn.ops.slot_gather import slot_gather

    torch.manual_seed(0)
    b, h, s, d, n = 2, 3, 17, 5, 40  # n > s: rows repeat, so the backward sums
    index = torch.randint(0, s, (b, 1, n, 1))
    x = torch.randn(b, h, s, d).transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strided, as k is
    upstream = torch.randn(b, h, n, d)
    want = x.gather(2, index.expand(b, h, n, d))
    (want_grad,) = torch.autograd.grad(want, x, upstream)
    for gather in (slot_gather, torch.compile(slot_gather, backend="aot_eager", fullgraph=True)):
        got = gather(x, index)
        (got_grad,) = torch.autograd.grad(got, x, upstream)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)
    torch.library.opcheck(slot_gather, (x, index))


@pytest.mark.parametrize("impl", ["gather", "reference"])
def test_causal_given_a_causal_graph(impl):
    attn, graph = attention(impl=impl), random_graph(2, 50)
    x = torch.randn(2, 50, 24)
    y = x.clone()
    y[:, 30:] = torch.randn(2, 20, 24)
    with torch.no_grad():
        a, b = attn(x, graph_ctx(graph)), attn(y, graph_ctx(graph))
    torch.testing.assert_close(a[:, :30], b[:, :30])
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_each_row_uses_its_own_graph():
    attn, graph = attention(), random_graph(3, 40)
    with torch.no_grad():
        same = attn(torch.randn(1, 40, 24).expand(3, -1, -1), graph_ctx(graph))
        assert not torch.allclose(same[0], same[1])
        x = torch.randn(3, 40, 24)
        perm = torch.tensor([2, 0, 1])
        permuted = Graph(*(field[perm] for field in graph))
        torch.testing.assert_close(attn(x[perm], graph_ctx(permuted)), attn(x, graph_ctx(graph))[perm])


def test_edge_type_bias_changes_outputs_and_learns():
    attn, graph = GraphAttention(24, 3), random_graph(2, 40)
    x = torch.randn(2, 40, 24)
    with torch.no_grad():
        before = attn(x, graph_ctx(graph))
        attn.edge_bias[:, 3] = 2.0
    after = attn(x, graph_ctx(graph))
    assert not torch.allclose(before, after)
    after.pow(2).sum().backward()
    assert (attn.edge_bias.grad != 0).all()


def test_graph_attention_needs_the_graph_and_counts_its_edges():
    attn, graph = GraphAttention(24, 3), random_graph(2, 40)
    with pytest.raises(RuntimeError, match="semantic_graph"):
        attn(torch.randn(2, 40, 24), SequenceContext(positions=torch.arange(40).expand(2, -1)))
    projections = 2 * 4 * 24 * 24
    assert attn.flops_per_token(40) == projections + 4 * 16 * 24
    attn(torch.randn(2, 40, 24), graph_ctx(graph))
    edges = (graph.neighbors >= 0).sum().item() / 80
    assert attn.flops_per_token(40) == pytest.approx(projections + 4 * edges * 24)


def test_semantic_state_shapes_and_temporal_start():
    emb = SemanticStateEmbedding(32, vocab_size=50)
    x, mu = emb.embed(torch.randint(0, 50, (2, 9)))
    assert x.shape == (2, 9, 32) and mu.shape == (2, 9, 64)
    assert (emb.temporal.weight == 0).all()
    assert set(emb.stats) == {"orthogonality", "variance"}


def test_block_attention_is_causal_and_mixes_blocks():
    emb = SemanticStateEmbedding(32, vocab_size=50, block_attention=True).eval()
    tokens = torch.randint(0, 50, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 50
    with torch.no_grad():
        (x, mu), (x2, mu2) = emb.embed(tokens), emb.embed(changed)
        torch.testing.assert_close(x[:, :12], x2[:, :12])
        torch.testing.assert_close(mu[:, :12], mu2[:, :12])
        assert not torch.allclose(mu, emb.mu_proj(emb.factor(tokens)))


def test_aux_loss():
    tokens = torch.randint(0, 50, (2, 16))
    emb = SemanticStateEmbedding(32, vocab_size=50, block_attention=True)
    emb.embed(tokens)
    assert torch.isfinite(emb.aux_loss) and emb.aux_loss > 0
    emb.aux_loss.backward()
    for param in (emb.factor.weight, emb.mu_proj.weight, emb.block_qkv):
        assert param.grad is not None and param.grad.abs().sum() > 0
    silent = SemanticStateEmbedding(32, vocab_size=50, orthogonality_weight=0.0, variance_weight=0.0)
    silent.embed(tokens)
    assert silent.aux_loss == 0


def test_mu_blocks_are_contiguous_slices_in_order():
    mu = torch.arange(64.0).expand(2, 3, 64)
    blocks = mu_blocks(mu)
    assert blocks.shape == (2, 3, 16, 4)
    assert blocks[0, 0, 2].tolist() == [8.0, 9.0, 10.0, 11.0]  # R1


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: SemanticStateEmbedding(32, 0), "vocab_size"),
        (lambda: SemanticStateEmbedding(32, 50, temporal_dim=0), "temporal_dim"),
        (lambda: SemanticStateEmbedding(32, 50, variance_weight=-1.0), "variance_weight"),
        (lambda: SemanticStateEmbedding(32, 50, dropout=1.0), "dropout"),
        (lambda: GraphAttention(24, 0), "num_heads"),
        (lambda: GraphAttention(24, 3, head_dim=5), "head_dim"),
        (lambda: GraphAttention(24, 3, impl="dense"), "impl"),
    ],
)
def test_bad_arguments_name_themselves(make, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        make()


def test_attention_dropout_applies_on_every_path_that_trains_or_is_refused():
    """gather and reference drop attention weights in training (not in eval); flex has no dropout and says so."""
    graph, x = random_graph(2, 30), torch.randn(2, 30, 24)
    for impl in ("gather", "reference"):
        attn = attention(impl=impl, dropout=0.5)
        attn.eval()
        plain = attn(x, graph_ctx(graph))
        torch.testing.assert_close(attn(x, graph_ctx(graph)), plain)
        attn.train()
        assert not torch.allclose(attn(x, graph_ctx(graph)), plain), impl
    with pytest.raises(ValueError, match="^dropout: impl 'flex' has no attention dropout"):
        GraphAttention(24, 3, impl="flex", dropout=0.1)
