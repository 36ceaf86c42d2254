import pytest
import torch

from soma_lightning import build_model
from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.gqa import GroupedQueryAttention
from soma_lightning.nn.ops.attention.backends import FlexBackend, SDPABackend
from soma_lightning.nn.ops.attention.masks import dense_mask, visible
from soma_lightning.spec import SpecError
from conftest import tiny_v1_arch


def _ctx(b, t, doc_ids=None):
    return SequenceContext(positions=torch.arange(t).expand(b, -1), doc_ids=doc_ids)


def _docs(b, t):
    """Random packed documents: ids increase along each row."""
    starts = torch.rand(b, t) < 0.1
    starts[:, 0] = True
    return starts.long().cumsum(dim=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_heads": 4, "num_kv_heads": 2},
        {"num_heads": 4, "num_kv_heads": 1, "window": 7, "global_stride": 4, "qk_norm": True},
        {"num_heads": 6, "num_kv_heads": 3, "window": 16, "head_dim": 10},
    ],
)
@pytest.mark.parametrize("with_docs", [False, True])
def test_sdpa_and_flex_equal_the_dense_reference(kwargs, with_docs):
    b, t = 2, 70
    docs = _docs(b, t) if with_docs else None
    x = torch.randn(b, t, 24)
    outputs = {}
    for impl in ("reference", "sdpa", "flex"):
        torch.manual_seed(0)
        attn = GroupedQueryAttention(24, impl=impl, **kwargs).eval()
        with torch.no_grad():
            outputs[impl] = attn(x, _ctx(b, t, docs))
    torch.testing.assert_close(outputs["sdpa"], outputs["reference"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["flex"], outputs["reference"], rtol=1e-5, atol=1e-5)


def test_local_global_pattern():
    q = torch.arange(12)[:, None]
    k = torch.arange(12)[None, :]
    mask = visible(q, k, window=3, global_stride=5)
    assert mask[11].nonzero().flatten().tolist() == [0, 5, 9, 10, 11]
    assert mask[4].nonzero().flatten().tolist() == [0, 2, 3, 4]
    assert not mask.triu(1).any()


def test_documents_never_attend_across_boundaries():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    mask = dense_mask(8, None, None, docs, torch.device("cpu"))[0, 0]
    assert mask[4].nonzero().flatten().tolist() == [3, 4]
    assert mask[5].nonzero().flatten().tolist() == [5]
    attn = GroupedQueryAttention(16, num_heads=2).eval()
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[0, :3] = torch.randn(3, 16)  # change document 0 only
    with torch.no_grad():
        a, b = attn(x, _ctx(1, 8, docs)), attn(y, _ctx(1, 8, docs))
    torch.testing.assert_close(a[0, 3:], b[0, 3:])
    assert not torch.allclose(a[0, :3], b[0, :3])


@pytest.mark.parametrize("t, window, stride", [(64, 4, 8), (64, 5, 3), (30, 40, 8), (100, 16, None), (97, 10, 1)])
def test_flops_count_keys_in_the_pattern(t, window, stride):
    local = GroupedQueryAttention(64, num_heads=4, window=window, global_stride=stride)
    keys = visible(torch.arange(t)[:, None], torch.arange(t)[None, :], window, stride).sum().item() / t
    projections = 2 * 4 * 64 * 64
    assert local.flops_per_token(t) == pytest.approx(projections + 4 * 64 * keys)
    full = GroupedQueryAttention(64, num_heads=4)
    assert full.flops_per_token(t) == pytest.approx(projections + 4 * 64 * (t + 1) / 2)


@pytest.mark.parametrize("kwargs, message", [({"num_heads": 6, "num_kv_heads": 4}, "num_kv_heads"), ({"num_heads": 4, "global_stride": 4}, "global_stride"), ({"num_heads": 4, "head_dim": 5}, "head_dim")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GroupedQueryAttention(24, **kwargs)


def test_flex_refuses_attention_dropout_at_construction():
    """FlexAttention has no dropout: asking for both is an error up front, not dropout silently skipped."""
    with pytest.raises(ValueError, match="^dropout: impl 'flex' has no attention dropout"):
        GroupedQueryAttention(24, num_heads=4, window=8, dropout=0.1, impl="flex")
    GroupedQueryAttention(24, num_heads=4, window=8, impl="flex")
    arch = tiny_v1_arch(d_model=32, hidden_dim=32, dropout=0.1)
    arch["blocks"]["layer"][0]["mixer"] = {"type": "gqa", "num_heads": 4, "window": 8, "impl": "flex"}
    with pytest.raises(SpecError, match=r"mixer\.dropout: impl 'flex' has no attention dropout"):
        build_model(arch)


@pytest.mark.parametrize("impl", ["auto", "sdpa", "reference"])
def test_attention_dropout_applies_in_training_only(impl):
    b, t = 2, 30
    attn = GroupedQueryAttention(24, num_heads=4, num_kv_heads=2, window=7, global_stride=4, dropout=0.5, impl=impl)
    x, docs = torch.randn(b, t, 24), _docs(b, t)
    with torch.no_grad():
        assert not torch.allclose(attn(x, _ctx(b, t, docs)), attn(x, _ctx(b, t, docs)))
        attn.eval()
        torch.testing.assert_close(attn(x, _ctx(b, t, docs)), attn(x, _ctx(b, t, docs)))


def test_auto_takes_flex_on_cuda_only_without_dropout_and_with_heads_its_kernels_take():
    """Checked on CPU with a stand-in for a CUDA tensor: training with dropout runs SDPA, which can drop, and so
    do heads under 16 dims, which FlexAttention's CUDA kernels refuse (differential attention's maps see half
    a head)."""
    from types import SimpleNamespace

    on_cuda, on_cpu, ctx = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False), _ctx(1, 8)
    attn = GroupedQueryAttention(64, num_heads=4, window=8, dropout=0.1)
    assert isinstance(attn.backend.pick(on_cuda, ctx, None, 0.0), FlexBackend)
    assert isinstance(attn.backend.pick(on_cuda, ctx, None, 0.1), SDPABackend)
    assert isinstance(attn.backend.pick(on_cpu, ctx, None, 0.0), SDPABackend)
    for head_dim, differential, picked in ((8, False, SDPABackend), (32, True, FlexBackend), (24, True, SDPABackend)):
        attn = GroupedQueryAttention(64, num_heads=4, head_dim=head_dim, window=8, differential=differential)
        assert isinstance(attn.backend.pick(on_cuda, ctx, None, 0.0), picked), (head_dim, differential)


def test_flex_on_cuda_refuses_heads_under_16_dims_by_name():
    """Checked on CPU with fake CUDA tensors. Without the check, inductor fails deep in compilation with an error
    that names no argument a user can change."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from soma_lightning.nn.ops.attention.flex import flex

    with FakeTensorMode():
        small, large = torch.empty(2, 4, 32, 8, device="cuda"), torch.empty(2, 4, 32, 16, device="cuda")
        with pytest.raises(ValueError, match="^impl: FlexAttention on CUDA needs head dims of at least 16, got 8 for queries and keys and 16 for values"):
            flex(small, small, large, None)
        with pytest.raises(ValueError, match="got 16 for queries and keys and 8 for values"):
            flex(large, large, small, None)
