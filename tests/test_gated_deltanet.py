import pytest
import torch
import torch.nn.functional as F

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.ops.delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent, short_conv
from soma_lightning.nn.gated_deltanet import GatedDeltaNet

B, T, H, HV, K, V = 2, 100, 2, 4, 16, 16


def _inputs(t=T):
    """q, k, v, g, beta with gradients, as the layer would produce them."""
    q, k = torch.randn(B, t, H, K), torch.randn(B, t, H, K)
    v = torch.randn(B, t, HV, V)
    g = F.logsigmoid(torch.randn(B, t, HV) + 2)
    beta = torch.rand(B, t, HV)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def _resets(t=T):
    resets = torch.rand(B, t) < 0.05
    resets[0, 0] = True
    resets[1, 32] = True  # a chunk boundary for chunk sizes 16 and 32
    resets[1, 45] = True
    return resets


def _pieces(resets_row):
    """Document spans [start, end) of one row."""
    starts = [0] + [i for i in resets_row.nonzero().flatten().tolist() if i > 0]
    return list(zip(starts, starts[1:] + [len(resets_row)]))


@pytest.mark.parametrize("with_resets", [False, True])
@pytest.mark.parametrize("chunk_size", [16, 32])
def test_chunked_equals_recurrent_with_gradients(with_resets, chunk_size):
    inputs = _inputs()
    resets = _resets() if with_resets else None
    grad_out = torch.randn(B, T, HV, V)
    results = []
    for run in (gated_delta_rule_recurrent, lambda *a: gated_delta_rule_chunked(*a, chunk_size=chunk_size)):
        o = run(*inputs, resets)
        results.append((o, torch.autograd.grad(o, inputs, grad_out)))
    (o_rec, grads_rec), (o_chunk, grads_chunk) = results
    torch.testing.assert_close(o_chunk, o_rec, atol=1e-5, rtol=1e-5)
    for name, a, b in zip("q k v g beta".split(), grads_chunk, grads_rec):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_strong_decay_keeps_gradients_finite():
    q, k, v, _, beta = _inputs()
    g = torch.full((B, T, HV), -30.0, requires_grad=True)  # exp(G_i - G_j) for j > i overflows unmasked
    gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=32).sum().backward()
    assert all(x.grad.isfinite().all() for x in (q, k, v, g, beta))


@pytest.mark.parametrize("run", [gated_delta_rule_recurrent, gated_delta_rule_chunked])
def test_resets_equal_separate_documents(run):
    q, k, v, g, beta = (x.detach() for x in _inputs())
    resets = _resets()
    o = run(q, k, v, g, beta, resets)
    for row in range(B):
        pieces = [run(*(x[row : row + 1, s:e] for x in (q, k, v, g, beta))) for s, e in _pieces(resets[row])]
        torch.testing.assert_close(o[row : row + 1], torch.cat(pieces, dim=1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(o, run(q, k, v, g, beta))


def test_short_conv():
    x, weight = torch.randn(B, T, 12), torch.randn(12, 4)
    expected = F.silu(F.conv1d(x.transpose(1, 2), weight[:, None, :], padding=3, groups=12)[..., :T].transpose(1, 2))
    torch.testing.assert_close(short_conv(x, weight), expected)
    resets = _resets()
    y = short_conv(x, weight, resets)
    for row in range(B):
        pieces = [short_conv(x[row : row + 1, s:e], weight) for s, e in _pieces(resets[row])]
        torch.testing.assert_close(y[row : row + 1], torch.cat(pieces, dim=1))


def _layer(**kwargs):
    return GatedDeltaNet(24, num_heads=H, num_v_heads=HV, head_dim=K, v_head_dim=V, **kwargs)


def _ctx(t, doc_ids=None):
    return SequenceContext(positions=torch.arange(t).expand(B, -1), doc_ids=doc_ids)


def test_layer_is_causal():
    layer, x = _layer(), torch.randn(B, 70, 24)
    y = x.clone()
    y[:, 40:] = torch.randn(B, 30, 24)
    with torch.no_grad():
        a, b = layer(x, _ctx(70)), layer(y, _ctx(70))
    torch.testing.assert_close(a[:, :40], b[:, :40])
    assert not torch.allclose(a[:, 40:], b[:, 40:])


def test_layer_keeps_documents_apart():
    layer, x = _layer(), torch.randn(B, 70, 24)
    doc_ids = torch.tensor([0] * 30 + [1] * 40).expand(B, -1)
    y = x.clone()
    y[:, :30] = torch.randn(B, 30, 24)  # change document 0 only
    ctx = _ctx(70, doc_ids)
    with torch.no_grad():
        a, b = layer(x, ctx), layer(y, _ctx(70, doc_ids))
    resets, bounds = ctx.delta_resets  # built once per pass, with fla's sequence bounds
    assert resets.nonzero().tolist() == [[0, 30], [1, 30]]
    assert bounds.tolist() == [0, 30, 70, 100, 140]
    torch.testing.assert_close(a[:, 30:], b[:, 30:])
    assert not torch.allclose(a[:, :30], b[:, :30])


def test_layer_impls_agree_and_gradients_are_finite():
    x = torch.randn(B, 70, 24)
    doc_ids = torch.tensor([0] * 30 + [1] * 40).expand(B, -1)
    outputs = {}
    for impl in ("recurrent", "chunked"):
        torch.manual_seed(0)
        layer = _layer(impl=impl)
        outputs[impl] = layer(x, _ctx(70, doc_ids))
    torch.testing.assert_close(outputs["chunked"], outputs["recurrent"], atol=1e-5, rtol=1e-5)
    outputs["chunked"].pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in layer.parameters())


def test_auto_trains_in_pytorch_where_fla_backward_is_blocked(monkeypatch):
    """fla 0.6 raises in its gated backward on Hopper with Triton < 3.7.1 and no tilelang: "auto" must not take
    fla for a forward that needs a gradient there (checked on CPU with a stand-in for a CUDA tensor)."""
    from types import SimpleNamespace

    import soma_lightning.nn.ops.delta_rule as delta_rule

    on_cuda, on_cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    monkeypatch.setattr(delta_rule, "_fla_importable", lambda: True)
    monkeypatch.setattr(delta_rule, "fla_backward_blocked", lambda: "fla's backward refuses this Triton")
    with pytest.warns(UserWarning, match="refuses this Triton; training runs the delta rule in PyTorch"):
        assert not delta_rule._use_fla_delta_rule("auto", on_cuda)
    with torch.no_grad():
        assert delta_rule._use_fla_delta_rule("auto", on_cuda)  # its forward is fine
    assert delta_rule._use_fla_delta_rule("fla", on_cuda)  # asked for by name: fla's own error stands
    monkeypatch.setattr(delta_rule, "fla_backward_blocked", lambda: None)
    assert delta_rule._use_fla_delta_rule("auto", on_cuda)
    assert not delta_rule._use_fla_delta_rule("auto", on_cpu)


def test_compiled_code_takes_the_fla_checks_as_constants_without_tracing_them():
    """Compiled blocks ask which delta rule form to run on every compile; dynamo must read the cached answer
    as a constant, not trace into the cache (it warns of "potential silent incorrectness" when it does)."""
    import warnings

    from soma_lightning.nn.ops.delta_rule import _fla_importable

    def step(x):
        return x + 1 if _fla_importable() else x - 1

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = torch.compile(step, backend="eager", fullgraph=True)(torch.zeros(2))
    torch.testing.assert_close(got, step(torch.zeros(2)))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_v_heads": 3}, "num_v_heads"),
        ({"conv_size": 0}, "conv_size"),
        ({"head_dim": 0}, "head_dim"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"impl": "triton"}, "impl"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        GatedDeltaNet(24, num_heads=2, **kwargs)
