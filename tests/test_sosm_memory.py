"""memory_attention: HNSW retrieval against the exact search, the layer against a dense reference, gradients
through the retrieved keys, cached decoding against a full pass, and use in a SOSM spec."""

import math

import pytest
import torch
from torch import Tensor

from soma_lightning import build_model, load_spec
from soma_lightning.errors import SpecError
from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import DecodeState
from soma_lightning.nn.memory_attention import ChunkMemory, MemoryAttention
from soma_lightning.nn.ops.attention.reference import masked_attention_reference
from soma_lightning.nn.rope import apply_rope


def _ctx(b: int, t: int, doc_ids=None) -> SequenceContext:
    return SequenceContext(positions=torch.arange(t).expand(b, -1), doc_ids=doc_ids)


def _layer(impl: str, **args) -> MemoryAttention:
    torch.manual_seed(0)
    layer = MemoryAttention(32, num_heads=4, impl=impl, **({"chunk_size": 8, "top_k": 4, "ef_search": 256} | args))
    torch.nn.init.normal_(layer.slot_bias)
    return layer


def dense_memory_reference(layer: MemoryAttention, x: Tensor, doc_ids=None) -> Tensor:
    """The layer's function written densely: for each query the brute-force top_k over all keys of the earlier
    chunks from the full [T, T] retrieval scores, plus its chunk up to itself, in one float32 softmax."""
    b, t, _ = x.shape
    h, hd, c = layer.num_heads, layer.head_dim, layer.chunk_size
    q, k = layer.q_proj(x).view(b, t, h, hd), layer.k_proj(x).view(b, t, h, hd)
    v = layer.v_proj(x).view(b, t, h, hd).transpose(1, 2)
    scores = q.flatten(-2) @ k.flatten(-2).mT  # [B, T, T]
    pos = torch.arange(t)
    earlier = pos[None, :] < (pos[:, None] // c * c)  # key j in an earlier chunk than query i
    top = scores.masked_fill(~earlier, float("-inf")).topk(layer.top_k, dim=-1)
    memory = torch.zeros(b, t, t, dtype=torch.bool).scatter_(-1, top.indices, top.values.isfinite())
    local = ((pos[None, :] // c == pos[:, None] // c) & (pos[None, :] <= pos[:, None])).expand(b, t, t)
    if doc_ids is not None:
        local = local & (doc_ids[:, :, None] == doc_ids[:, None, :])
    bias = layer.slot_bias[:, 0, None, None] * local[:, None] + layer.slot_bias[:, 1, None, None] * memory[:, None]
    cos, sin = _ctx(b, t).rope(hd, layer.rope_base)
    q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
    y = masked_attention_reference(q, k, v, (local | memory)[:, None], bias)
    return layer.o_proj(y.transpose(1, 2).reshape(b, t, h * hd))


@pytest.mark.parametrize("impl", ["exact", "hnsw"])
def test_layer_equals_the_dense_reference(impl):
    layer = _layer(impl)
    x = torch.randn(2, 37, 32)
    doc_ids = (torch.arange(37) >= 20).long().expand(2, -1)
    for docs in (None, doc_ids):
        torch.testing.assert_close(layer(x, _ctx(2, 37, docs)), dense_memory_reference(layer, x, docs), rtol=1e-5, atol=1e-5)


def test_hnsw_equals_exact_values_and_gradients_when_it_finds_the_exact_neighbours():
    x = torch.randn(3, 45, 32)
    outputs = []
    for impl in ("exact", "hnsw"):
        layer, xi = _layer(impl), x.clone().requires_grad_()
        y = layer(xi, _ctx(3, 45))
        y.square().sum().backward()
        outputs.append((y, xi.grad, layer.q_proj.weight.grad, layer.slot_bias.grad))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_hnsw_recall_against_exact_search():
    torch.manual_seed(0)
    keys, queries = torch.randn(2, 1024, 32), torch.randn(2, 64, 32)
    found = {}
    for impl in ("exact", "hnsw"):
        memory = ChunkMemory(chunk_size=64, top_k=10, impl=impl, ef_search=32, ef_construction=64, hnsw_m=8)
        memory.extend(keys)
        found[impl] = memory.search(queries, chunk=16)
    assert (found["exact"] >= 0).all() and found["exact"].max() < 1024
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found["exact"].flatten(0, 1), found["hnsw"].flatten(0, 1)))
    recall = hits / found["exact"].numel()
    assert 0.9 <= recall <= 1.0, recall


def test_memory_reads_only_earlier_chunks_and_carries_the_gradient_there():
    layer = _layer("exact", top_k=3)
    memory = layer.new_memory()
    q = torch.randn(1, 40, 32)
    memory.extend(torch.randn(1, 40, 32))
    slots = layer.slots(q, memory, 0)
    c = layer.chunk_size
    for i in range(40):
        found = slots[0, i, c:]
        assert ((found < i // c * c) | (found == -1)).all()
        assert (found >= 0).sum() == min(3, i // c * c)
    # Position 39 (chunk 4) reads the positions before 32 only through its 3 memory slots, and the gradient
    # of its output reaches exactly those.
    x = torch.randn(1, 40, 32, requires_grad=True)
    layer(x, _ctx(1, 40))[0, 39].sum().backward()
    assert (x.grad[0, :32].abs().sum(-1) > 0).sum() == 3 and (x.grad[0, 32:].abs().sum(-1) > 0).all()


def _sosm_memory_spec(impl: str = "hnsw"):
    spec = load_spec("specs/sosm_tiny.yaml")
    spec.blocks["layer"][0]["mixer"] = {"type": "memory_attention", "num_heads": 4, "chunk_size": 8, "top_k": 4, "impl": impl}
    return spec


@pytest.mark.parametrize("impl", ["exact", "hnsw"])
def test_cached_decoding_equals_a_full_pass(impl):
    torch.manual_seed(0)
    model = build_model(_sosm_memory_spec(impl)).eval()
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        state = DecodeState()
        steps = [model.predict(model.extend(tokens[:, :11], state)[0])]  # a prompt over two chunks
        steps += [model.predict(model.extend(tokens[:, i : i + 1], state)[0]) for i in range(11, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_rollback_into_an_indexed_chunk_rebuilds_the_memory():
    torch.manual_seed(0)
    model = build_model(_sosm_memory_spec()).eval()
    tokens = torch.randint(0, 256, (1, 28))
    other = tokens.clone()
    other[:, 14:] = torch.randint(0, 256, (1, 14))
    with torch.no_grad():
        state = DecodeState()
        model.extend(tokens[:, :12], state)
        model.extend(other[:, 12:20], state)  # chunk 1 (8..15) gets indexed with the wrong tokens 14, 15
        state.rollback(14)
        rest = model.predict(model.extend(tokens[:, 14:28], state)[0])
        torch.testing.assert_close(rest, model(tokens)[:, 14:], rtol=1e-5, atol=1e-5)


def test_sosm_spec_with_memory_attention_trains_a_step():
    from soma_lightning.lm import SomaLM

    torch.manual_seed(0)
    lm = SomaLM(_sosm_memory_spec())
    tokens = torch.randint(0, 256, (2, 40))
    logits = lm.model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    attention = lm.model.encoder.layers[0].attention
    for p in (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight, attention.slot_bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert math.isfinite(loss.item())


def test_bad_arguments_name_the_key():
    spec = _sosm_memory_spec()
    spec.blocks["layer"][0]["mixer"]["impl"] = "faiss"
    with pytest.raises(SpecError, match=r"mixer.impl: expected one of 'hnsw', 'exact', got 'faiss'"):
        build_model(spec)
    spec.blocks["layer"][0]["mixer"] |= {"impl": "exact", "chunk_size": 0}
    with pytest.raises(SpecError, match=r"mixer.chunk_size: must be positive, got 0"):
        build_model(spec)
