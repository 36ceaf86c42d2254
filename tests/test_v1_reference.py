"""Our V1 against soma-models' torch modules (the reference), module by module and end to end."""

import pytest
import torch
import torch.nn.functional as F
from soma_models.v1.configs import ModelConfig, SIGRegConfig as RefSIGRegConfig
from soma_models.v1.torch.loss import compute_loss
from soma_models.v1.torch.modules.attention import apply_rope as ref_apply_rope
from soma_models.v1.torch.modules.model import Model as RefModel
from soma_models.v1.torch.modules.sig_reg import SIGReg as RefSIGReg

from soma_lightning import build_model
from soma_lightning.data_modules.contract import PAD
from soma_lightning.nn.ops.attention.reference import causal_attention_reference
from soma_lightning.nn.rope import apply_rope, rope_angles, rope_tables
from soma_lightning.nn.sigreg import sigreg_statistic
from conftest import tiny_v1_arch


def _pair(d_model=16, n_layers=2, num_heads=4, hidden_dim=32, impl="sdpa"):
    ours = build_model(tiny_v1_arch(d_model, n_layers, num_heads, hidden_dim, impl=impl)).eval()
    ref = RefModel(ModelConfig(dropout_rate=0.0, embedding_dim=d_model, pwff_hidden_dim=hidden_dim, num_layers=n_layers, num_heads=num_heads)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def test_rope_equals_contract_formula_and_reference():
    hd, b, t, h = 8, 2, 7, 3
    x = torch.randn(b, t, h, hd)
    positions = torch.randint(0, 5000, (b, t))
    ours = apply_rope(x, *rope_tables(positions, hd, 10000.0, 1.0))
    torch.testing.assert_close(ours, ref_apply_rope(x, positions, hd), rtol=1e-5, atol=1e-5)
    # contract section 2, written out element by element in float64
    expected = torch.empty_like(x, dtype=torch.float64)
    for i in range(hd // 2):
        theta = positions.double() / (10000.0 ** ((2 * i) / hd))
        a, bb = x[..., i].double(), x[..., i + hd // 2].double()
        expected[..., i] = a * theta.cos()[..., None] - bb * theta.sin()[..., None]
        expected[..., i + hd // 2] = bb * theta.cos()[..., None] + a * theta.sin()[..., None]
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4)


def test_rope_scale_factor_divides_positions():
    positions = torch.arange(10).unsqueeze(0)
    torch.testing.assert_close(rope_angles(positions, 8, scale_factor=4.0), rope_angles(positions, 8) / 4.0)


def test_sdpa_equals_plain_softmax_reference():
    q, k, v = (torch.randn(2, 4, 33, 16) for _ in range(3))
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True), causal_attention_reference(q, k, v), rtol=1e-5, atol=1e-5)
    sdpa, _ = _pair(impl="sdpa")
    plain, _ = _pair(impl="reference")
    plain.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, 264, (3, 40))
    torch.testing.assert_close(sdpa(tokens), plain(tokens), rtol=1e-5, atol=1e-5)


def test_reference_attention_runs_in_float32_under_bf16_autocast():
    model = build_model(tiny_v1_arch(d_model=32, hidden_dim=64, impl="reference")).eval()
    tokens = torch.randint(0, 264, (2, 30))
    expected = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize("shape", [(16, 2, 4, 32), (64, 1, 8, 256)])
def test_model_equals_reference(shape):
    ours, ref = _pair(*shape)
    tokens = torch.randint(0, 264, (3, 50))
    positions = torch.randint(0, 3000, (3, 50))
    torch.testing.assert_close(ours.encode(tokens, positions), ref.encode(tokens, positions), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(tokens, positions), ref(tokens, positions), rtol=1e-5, atol=1e-5)


def test_sigreg_equals_reference():
    for d in (16, 64):
        reps = torch.randn(3, 20, d) * 1.3
        noise = torch.randn(d, 256)
        ref = RefSIGReg(RefSIGRegConfig())
        expected = ref.compute(reps, noise) / 0.02
        torch.testing.assert_close(sigreg_statistic(reps, noise), expected, rtol=1e-6, atol=0)


def test_training_loss_equals_reference_compute_loss():
    ours, ref = _pair()
    tokens = torch.randint(0, 256, (4, 64))
    targets = torch.cat([tokens[:, 1:], torch.full((4, 1), PAD)], dim=1)
    targets[2, 30:] = PAD
    torch.manual_seed(7)
    ref_loss, ref_embedding = compute_loss(ref, RefSIGReg(RefSIGRegConfig()), tokens, targets)
    torch.manual_seed(7)
    noise = torch.randn(16, 256)
    reps = ours.encode(tokens)
    ce = F.cross_entropy(ours.predict(reps).flatten(0, 1), targets.flatten(), ignore_index=PAD)
    loss = ce + 0.02 * sigreg_statistic(reps, noise)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(reps.mean(1).mean(0), ref_embedding, rtol=1e-5, atol=1e-6)
