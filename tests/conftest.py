import pytest
import torch

from soma_lightning.spec import ModelSpec


def tiny_v1_arch(d_model: int = 16, n_layers: int = 2, num_heads: int = 4, hidden_dim: int = 32, dropout: float = 0.0, **mixer_args) -> dict:
    """The reference's small V1 config (D 16, FF 32, 2 layers, 4 heads) as a spec mapping."""
    return {
        "d_model": d_model,
        "n_layers": n_layers,
        "dropout": dropout,
        "blocks": {
            "layer": [
                {"norm": "layernorm", "mixer": {"type": "mha", "num_heads": num_heads, **mixer_args}},
                {"norm": "layernorm", "ffn": {"type": "gelu_mlp", "hidden_dim": hidden_dim}},
            ]
        },
    }


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return ModelSpec(**tiny_v1_arch())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
