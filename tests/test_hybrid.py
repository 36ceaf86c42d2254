"""The hybrid superblock specs: sizes against the analytic formula, and a CPU training smoke run."""

import pytest

from soma_lightning import build_model, load_spec
from soma_lightning.measure import count_parameters
from conftest import train_tiny_spec


def analytic_parameters(d, layers, vocab, qk_heads, v_heads, head_dim, attn_heads, kv_heads, attn_head_dim, experts, top_k, hidden, horizons, conv=4):
    """One superblock: 5 RMSNorms, Gated DeltaNet, two MoEs, GQA with QK-norm, MTP heads of `horizons`."""
    key, value = qk_heads * head_dim, v_heads * head_dim
    deltanet = 2 * d * key + 2 * d * value + 2 * d * v_heads + value * d  # q, k; v, gate; decay, update; out
    deltanet += (2 * key + value) * conv + 2 * v_heads + head_dim  # conv taps, A_log and dt_bias, output norm
    attention = d * attn_heads * attn_head_dim + 2 * d * kv_heads * attn_head_dim + attn_heads * attn_head_dim * d + 2 * attn_head_dim
    expert = 3 * d * hidden  # SwiGLU: gate, up, down
    moe = d * experts + experts * expert
    mtp = horizons * (d * d + d)  # projection and RMSNorm per horizon
    superblock = 5 * d + deltanet + 2 * moe + attention + mtp
    total = 2 * vocab * d + layers * superblock + d  # embedding, predictor (no bias), final norm
    active = total - layers * 2 * (experts - top_k) * expert
    return total, active


def test_design_scale_spec_is_within_10_percent_of_235b_and_matches_the_analytic_count():
    total, active = count_parameters(build_model(load_spec("specs/hybrid_235b.yaml"), device="meta"))
    assert (total, active) == analytic_parameters(8192, 12, 50432, 16, 32, 256, 64, 8, 256, 256, 8, 1536, 4)
    assert abs(total / 235e9 - 1) < 0.10
    assert (total, active) == (242_879_153_920, 18_198_677_248)


def test_one_h100_spec_sizes():
    total, active = count_parameters(build_model(load_spec("specs/hybrid_small.yaml"), device="meta"))
    assert (total, active) == analytic_parameters(1024, 6, 264, 4, 8, 128, 16, 2, 128, 32, 4, 512, 4)
    assert 0.6e9 < total < 0.75e9 and 0.1e9 < active < 0.2e9


@pytest.mark.slow
def test_tiny_spec_trains_on_cpu_with_mtp_and_routing_metrics(tmp_path):
    rows = [r for r in train_tiny_spec("specs/hybrid_tiny.yaml", tmp_path) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    for k in (1, 2):  # in-block heads of horizons 1, 2 and the sequential module's horizon 1
        ce = [float(r[f"train/mtp_{k}_ce"]) for r in rows]
        assert sum(ce[-10:]) < sum(ce[:10])
    assert all(r["train/moe_aux_loss"] for r in rows)
