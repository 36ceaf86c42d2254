"""Fast paths on a GPU against their plain references. Run where CUDA is available (bench machines)."""

import pytest
import torch
import torch.nn.functional as F

from soma_lightning import build_model
from soma_lightning.nn.attention import causal_attention_reference
from conftest import tiny_v1_arch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@cuda
def test_sdpa_bf16_flash_path_equals_reference_at_v1_head_dim():
    q, k, v = (torch.randn(2, 8, 1024, 256, device="cuda") for _ in range(3))
    ref = causal_attention_reference(q, k, v)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    assert _rel(out, ref) < 1e-2


@cuda
def test_model_bf16_autocast_equals_float32():
    model = build_model(tiny_v1_arch(d_model=256, num_heads=2, hidden_dim=1024), device="cuda").eval()
    tokens = torch.randint(0, 256, (2, 512), device="cuda")
    ref = model(tokens)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(tokens)
    assert _rel(out.float(), ref) < 1e-2
