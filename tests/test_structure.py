import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from soma_lightning import build_model
from soma_lightning.data_modules.structure import batch_structure, byte_structure
from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.gqa import GroupedQueryAttention
from soma_lightning.nn.ops.attention.flex import global_slots
from soma_lightning.nn.ops.attention.masks import dense_mask
from soma_lightning.nn.ops.attention.reference import masked_attention_reference
from soma_lightning.nn.ops.attention.structure_bias import structure_bias, structure_buckets, tree_distance
from conftest import tiny_v1_arch

CODE = b"def f(a, b):\n    return g(a)\n\nx = [1, (2)]\n"


def _spans(text: bytes, i: int) -> list[int]:
    return [v for v in byte_structure(text)[i].tolist() if v >= 0]


def test_code_spans_nest_by_line_indentation_bracket_and_word():
    assert _spans(CODE, CODE.index(b"a,")) == [0, 0, 5, 6]  # paragraph, line, bracket, word
    r = CODE.index(b"return")
    assert _spans(CODE, r) == [0, 0, r, r]  # the indented line nests inside the def line
    x = CODE.index(b"x =")
    assert _spans(CODE, x) == [x, x, x]  # a blank line starts a paragraph
    two = CODE.index(b"2")
    assert _spans(CODE, two) == [x, x, CODE.index(b"["), CODE.index(b"(2"), two]


def test_prose_spans_are_paragraph_line_word():
    text = b"To be, or not\nto be.\n\nThat is"
    assert _spans(text, text.index(b"not") + 1) == [0, 0, text.index(b"not")]
    assert _spans(text, text.index(b"to")) == [0, text.index(b"to"), text.index(b"to")]  # same indent: sibling line
    assert _spans(text, len(text) - 1)[0] == text.index(b"That")


def test_end_of_document_starts_a_new_paragraph():
    ids = list(b"f(a\n") + [257] + list(b"x")
    assert [v for v in byte_structure(ids)[-1].tolist() if v >= 0] == [5, 5, 5]


def test_structure_is_causal():
    rng = np.random.default_rng(0)
    for text in (list(CODE * 3), rng.integers(0, 258, 300).tolist(), rng.choice(list(b"ab ([{}])\n\t") + [257], 300).tolist()):
        full = byte_structure(text)
        for t in (0, 17, 101, len(text) - 1):
            assert np.array_equal(byte_structure(text[: t + 1]), full[: t + 1])


def test_tree_distance_against_brute_force():
    s = batch_structure(torch.tensor([list(CODE)]), 6)
    dist = tree_distance(s)[0]
    for q in range(0, len(CODE), 3):
        for k in range(0, len(CODE), 5):
            a, b = _spans(CODE, q)[:6], _spans(CODE, k)[:6]
            common = 0
            while common < min(len(a), len(b)) and a[common] == b[common]:
                common += 1
            assert dist[q, k] == len(a) + len(b) - 2 * common


PATTERNS = [(40, 16), (None, None), (40, None), (64, 50), (400, 64)]  # (window, global_stride)


@pytest.mark.parametrize("window, stride", PATTERNS)
def test_structure_buckets_are_the_clipped_tree_distance_of_each_visible_key(window, stride):
    structure = batch_structure(torch.tensor([list((CODE * 10)[i : i + 150]) for i in (0, 7)]))
    buckets = structure_buckets(structure, 6, window, stride).long()
    distance = tree_distance(structure).clamp(max=5)
    g = global_slots(150, stride)
    for q in range(150):
        for j in range(min(window or 150, q + 1)):  # column g + j: key q - j
            assert torch.equal(buckets[:, q, g + j], distance[:, q, q - j])
        for i in range(g):  # column i: global key i * stride
            if i * stride <= q:
                assert torch.equal(buckets[:, q, i], distance[:, q, i * stride])


def table_grad_relative_errors(device: str) -> list[float]:
    """structure_table_grad (structure_grad.py) against autograd through the dense reference attention, in
    float32, for every pattern with and without documents."""
    from soma_lightning.nn.ops.attention.structure_grad import structure_table_grad

    torch.manual_seed(0)
    b, t, h, h_kv, d, n = 2, 150, 4, 2, 16, 6
    structure = batch_structure(torch.tensor([list((CODE * 10)[i : i + t]) for i in (0, 7)])).to(device)
    starts = torch.rand(b, t, device=device) < 0.03
    starts[:, 0] = True
    errors = []
    for window, stride in PATTERNS:
        for doc_ids in (None, starts.long().cumsum(1)):
            q = torch.randn(b, h, t, d, device=device)
            k, v = torch.randn(2, b, h_kv, t, d, device=device)
            k_all, v_all = k.repeat_interleave(h // h_kv, 1), v.repeat_interleave(h // h_kv, 1)
            table = torch.randn(h, n, device=device, requires_grad=True)
            mask = dense_mask(t, window, stride, doc_ids, q.device)
            bias = structure_bias(table, structure)
            y = masked_attention_reference(q, k_all, v_all, mask, bias)
            d_y = torch.randn_like(y)
            (y * d_y).sum().backward()
            scores = q @ k_all.transpose(-1, -2) / d**0.5 + bias
            lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
            buckets = structure_buckets(structure, n, window, stride)
            got = structure_table_grad(q, k, v, y.detach(), d_y, lse.detach(), table.detach(), buckets, doc_ids, window, stride)
            errors.append(float((got - table.grad).abs().max() / table.grad.abs().max()))
    return errors


def test_table_grad_kernel_equals_autograd_of_the_dense_reference():
    """On a GPU the compiled kernel; on the CPU the same kernel in Triton's interpreter (which must be enabled
    before the kernel is defined, hence the subprocess)."""
    if torch.cuda.is_available():
        errors = table_grad_relative_errors("cuda")
    else:
        code = "from test_structure import table_grad_relative_errors; print(max(table_grad_relative_errors('cpu')))"
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        errors = [float(run.stdout.split()[-1])]
    assert max(errors) < 1e-5


def _inputs(b=2, t=90):
    text = (CODE * 5)[:t]
    tokens = torch.tensor([list(text)] * b)
    starts = torch.rand(b, t) < 0.05
    starts[:, 0] = True
    ctx = SequenceContext(positions=torch.arange(t).expand(b, -1), doc_ids=starts.long().cumsum(1), structure=batch_structure(tokens))
    return torch.randn(b, t, 32), ctx


@pytest.mark.parametrize("kwargs", [{"num_heads": 4, "num_kv_heads": 2}, {"num_heads": 4, "num_kv_heads": 1, "window": 9, "global_stride": 4}])
def test_structural_bias_flex_and_sdpa_equal_the_reference(kwargs):
    x, ctx = _inputs()
    outputs = {}
    for impl in ("reference", "sdpa", "flex"):
        torch.manual_seed(0)
        attn = GroupedQueryAttention(32, structure_buckets=6, impl=impl, **kwargs).eval()
        with torch.no_grad():
            attn.structure_bias.normal_()
            outputs[impl] = attn(x, SequenceContext(ctx.positions, ctx.doc_ids, ctx.structure))
    torch.testing.assert_close(outputs["sdpa"], outputs["reference"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["flex"], outputs["reference"], rtol=1e-5, atol=1e-5)


def test_structural_bias_learns_and_needs_structure():
    x, ctx = _inputs()
    attn = GroupedQueryAttention(32, num_heads=4, structure_buckets=6)
    attn(x, ctx).square().sum().backward()
    assert attn.structure_bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no `structure`"):
        attn(x, SequenceContext(ctx.positions))


@torch.no_grad()
def test_model_with_structural_bias_is_causal():
    arch = tiny_v1_arch(d_model=32, hidden_dim=32)
    arch["blocks"]["layer"][0]["mixer"] = {"type": "gqa", "num_heads": 4, "num_kv_heads": 2, "window": 12, "global_stride": 5, "structure_buckets": 8}
    model = build_model(arch).eval()
    for p in model.encoder.layers[0].attention.structure_bias, model.encoder.layers[1].attention.structure_bias:
        p.normal_()
    a = torch.tensor([list((CODE * 2)[:80])])
    b = a.clone()
    b[0, 41:] = torch.tensor(list(b"(((( [[ {{ \n\n  x y z" * 4))[:39]
    ra = model.encode(a, structure=batch_structure(a))
    rb = model.encode(b, structure=batch_structure(b))
    torch.testing.assert_close(ra[:, :41], rb[:, :41], rtol=0, atol=1e-6)
    assert not torch.allclose(ra[:, 41:], rb[:, 41:])
