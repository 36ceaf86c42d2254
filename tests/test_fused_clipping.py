"""Gradient clipping with a fused AdamW under bf16 mixed precision, which Lightning refuses on its own."""

import lightning as L
import pytest
import torch

from soma_lightning.lm import SomaLM
from soma_lightning.spec import ModelSpec
from conftest import tiny_v1_arch


def _module_with_gradients(precision: str, clip: float) -> tuple[SomaLM, torch.optim.Optimizer]:
    module = SomaLM(ModelSpec(**tiny_v1_arch()))
    trainer = L.Trainer(accelerator="cpu", precision=precision, gradient_clip_val=clip, logger=False, enable_checkpointing=False)
    module.trainer = trainer
    tokens = torch.randint(0, 256, (2, 16))
    module.model(tokens).float().pow(2).mean().mul(1e3).backward()
    return module, torch.optim.AdamW(module.parameters(), fused=True)


def _norm(module: SomaLM) -> float:
    return torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None]).item()


def test_bf16_clips_the_gradients_of_a_fused_optimizer_where_lightning_refuses():
    module, optimizer = _module_with_gradients("bf16-mixed", 0.5)
    assert _norm(module) > 0.5
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        module.clip_gradients(optimizer, 0.5, "norm")
    module.configure_gradient_clipping(optimizer, 0.5, "norm")
    assert _norm(module) == pytest.approx(0.5, rel=1e-4)


def test_clipping_by_value_and_full_precision_take_lightnings_path():
    module, optimizer = _module_with_gradients("bf16-mixed", 1e-3)
    module.configure_gradient_clipping(optimizer, 1e-3, "value")
    assert max(p.grad.abs().max().item() for p in module.parameters() if p.grad is not None) == pytest.approx(1e-3)
    module, optimizer = _module_with_gradients("32-true", 0.5)
    module.configure_gradient_clipping(optimizer, 0.5, "norm")
    assert _norm(module) == pytest.approx(0.5, rel=1e-4)
