"""The GPT-5-style MoE specs: sizes against the analytic formula, and a CPU training smoke run."""

import pytest

from soma_lightning import build_model, load_spec
from soma_lightning.measure import count_parameters
from conftest import train_tiny_spec


def analytic_parameters(d, layers, vocab, heads, kv_heads, experts, top_k, hidden, ngram_tables, buckets, modalities, buckets_bias, biased_layers):
    hd = d // heads
    attention = d * heads * hd + 2 * d * kv_heads * hd + heads * hd * d + 2 * hd  # q, k, v, o, qk-norm
    expert = d * 2 * hidden + hidden * d  # SwiGLU: gate and up, then down
    layer = 2 * d + attention + d * experts + experts * expert
    total = vocab * d + ngram_tables * buckets * d + modalities * d + layers * layer + biased_layers * heads * buckets_bias + d + d * vocab
    active = total - layers * (experts - top_k) * expert
    return total, active


def test_design_scale_spec_matches_the_analytic_count():
    model = build_model(load_spec("specs/gpt5_moe_design.yaml"), device="meta")
    expected = analytic_parameters(8192, 120, 524288, 64, 8, 16, 2, 32768, 3, 65536, 4, 32, 120)
    assert count_parameters(model) == expected
    assert 1.5e12 < expected[0] < 1.6e12


def test_one_h100_spec_is_about_1b_total_300m_active():
    total, active = count_parameters(build_model(load_spec("specs/gpt5_moe.yaml"), device="meta"))
    assert (total, active) == analytic_parameters(1024, 18, 264, 16, 4, 8, 2, 2048, 3, 16384, 2, 16, 3)
    assert 0.9e9 < total < 1.1e9 and 0.25e9 < active < 0.35e9


@pytest.mark.slow
def test_tiny_spec_trains_on_cpu_with_routing_metrics(tmp_path):
    rows = train_tiny_spec("specs/gpt5_moe_tiny.yaml", tmp_path)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    assert all(r["train/moe_aux_loss"] for r in rows if r.get("train/loss"))
    assert 1.0 <= float(rows[-2]["train/moe_max_load"]) < 4.0
    assert any(r.get("val/bits_per_byte") for r in rows)
