"""The component contract (nn/protocols.py): every registered component keeps it, measure.py and SomaLM read
it with the numbers and metrics they had, and the typed argument error names the full key path."""

import pytest
import torch
from torch import nn

from soma_lightning.lm import SomaLM
from soma_lightning.measure import count_parameters, train_flops_per_token
from soma_lightning.nn.embedding import HashedNgramEmbedding
from soma_lightning.nn.gqa import GroupedQueryAttention
from soma_lightning.nn.moe import MoE
from soma_lightning.nn.protocols import (
    AuxiliaryLosses,
    ComponentArgumentError,
    CountsFlops,
    LooksBack,
    Routed,
    after_train_batch,
    auxiliary_terms,
    default_name,
    flops_per_token,
    lookback,
    mtp_horizons,
    supports_static_decode,
)
from soma_lightning.components import REGISTRY, resolve_component
from soma_lightning.spec import SpecError, build_model, load_spec, spec_from_dict
from conftest import tiny_v1_arch

# Arguments each registered component needs beside the model-level ones.
ARGS = {
    "mha": {"num_heads": 4},
    "gqa": {"num_heads": 4, "num_kv_heads": 2},
    "gated_deltanet": {"num_heads": 2, "num_v_heads": 2, "head_dim": 8},
    "graph_attention": {"num_heads": 4},
    "memory_attention": {"num_heads": 4},
    "gelu_mlp": {"hidden_dim": 32},
    "moe": {"hidden_dim": 32, "num_experts": 4},
    "hashed_ngram": {"buckets": 64},
    "mtp_heads": {"horizons": 2},
}
INHERITED = {"d_model": 32, "dropout": 0.0, "vocab_ranges": {"text": [0, 264]}, "vocab_size": 264}
REGISTERED = [(kind, name) for kind, table in REGISTRY.items() for name in table]


@pytest.mark.parametrize("kind, name", REGISTERED)
def test_every_registered_component_keeps_the_contract(kind, name):
    comp = resolve_component(kind, {"type": name, **ARGS.get(name, {})}, "arch", INHERITED)
    module = comp.build()
    assert default_name(comp.factory, kind).isidentifier()
    assert (mtp_horizons(module) > 0) == (kind == "mtp")
    assert isinstance(supports_static_decode(module), bool)
    if kind in ("mixer", "ffn", "mtp"):
        assert flops_per_token(module, 64) > 0
    # Routed parameters sit outside Linear layers, so the default FLOP count would miss them.
    assert not isinstance(module, Routed) or isinstance(module, CountsFlops)
    # aux_losses and aux_metrics come together, and say nothing before the first forward.
    assert hasattr(module, "aux_losses") == hasattr(module, "aux_metrics")
    assert auxiliary_terms(module) == ({}, {})
    if kind == "embedding":  # without it, decoding would re-embed the whole sequence for every token
        assert isinstance(module, LooksBack)


def test_static_decode_and_lookback_defaults():
    assert supports_static_decode(nn.LayerNorm(8)) and supports_static_decode(nn.Dropout())
    assert not supports_static_decode(nn.Linear(8, 8)) and not supports_static_decode(MoE(8, 8))
    assert supports_static_decode(GroupedQueryAttention(32, 4))
    assert not supports_static_decode(GroupedQueryAttention(32, 4, structure_buckets=8))
    assert lookback(HashedNgramEmbedding(8, ngram_sizes=(2, 4)), default=99) == 3
    assert lookback(nn.Embedding(4, 8), default=99) == 99


# (total parameters, active parameters, train FLOPs per token at max_seq_len) as measure.py gave them
# before the contract.
MEASURED = {
    "specs/quickstart.yaml": (861192, 861192, 5317632.0),
    "specs/gpt5_moe_tiny.yaml": (223168, 174016, 594048.0),
    "specs/hybrid_tiny.yaml": (94496, 69920, 759360.0),
    "specs/sosm_tiny.yaml": (49560, 49560, 161280.0),
    "specs/sosm_hybrid_tiny.yaml": (59016, 59016, 314880.0),
}


@pytest.mark.parametrize("path", MEASURED)
def test_measure_is_unchanged(path):
    spec = load_spec(path)
    model = build_model(spec, device="meta")
    assert (*count_parameters(model), train_flops_per_token(model, spec.max_seq_len)) == MEASURED[path]


def test_measure_counts_mtp_horizons_and_routing():
    arch = tiny_v1_arch(n_layers=3)
    arch["blocks"]["layer"][1]["ffn"] = {"type": "moe", "hidden_dim": 32, "num_experts": 4, "top_k": 1}
    arch["blocks"]["layer"].append({"norm": "rmsnorm", "mtp": {"type": "mtp_heads", "horizons": 3}})
    arch["blocks"]["plain"] = tiny_v1_arch()["blocks"]["layer"]
    arch |= {"pattern": ["layer"], "mtp": {"horizons": 2, "block": "plain"}}
    model = build_model(arch, device="meta")
    assert count_parameters(model) == (38984, 25160)
    assert train_flops_per_token(model, 64) == 427104.0


def _sosm_moe_lm(balance: str = "switch") -> SomaLM:
    arch = {
        "d_model": 32, "n_layers": 2, "token_embedding": {"type": "semantic_state"},
        "blocks": {"layer": [
            {"norm": "layernorm", "mixer": {"type": "graph_attention", "num_heads": 4}},
            {"norm": "layernorm", "ffn": {"type": "moe", "hidden_dim": 32, "num_experts": 4, "capacity_factor": 1.0, "balance": balance}},
        ]},
    }
    torch.manual_seed(0)
    return SomaLM(spec_from_dict(arch))


def _batch() -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": torch.arange(16).expand(2, 16)}


def test_soma_lm_adds_and_logs_the_auxiliary_terms_it_did_before():
    lm = _sosm_moe_lm()
    logged = {}
    lm.log_dict = lambda metrics, **kw: logged.update(metrics)
    lm.log = lambda name, value, **kw: logged.update({name: value})
    loss = lm.training_step(_batch(), 0)

    state, routed = lm.model.embedding, [m for m in lm.model.modules() if isinstance(m, MoE)]
    loads = torch.stack([m.stats["tokens_per_expert"].float() for m in routed])
    moe_aux = sum(m.aux_loss for m in routed)
    expected = {
        "train/state_aux_loss": state.aux_loss,
        "train/state_orthogonality": state.stats["orthogonality"],
        "train/state_variance": state.stats["variance"],
        "train/moe_aux_loss": moe_aux,
        "train/moe_max_load": (loads.max(dim=1).values / loads.mean(dim=1)).mean(),
        "train/moe_dropped_fraction": torch.stack([m.stats["dropped_fraction"] for m in routed]).mean(),
    }
    assert set(logged) == {"train/ce", "train/sigreg", "train/loss", "train/bits_per_byte"} | set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(logged[name], value, rtol=0, atol=0)
    assert torch.equal(loss, logged["train/ce"] + lm.sigreg.coefficient * logged["train/sigreg"] + state.aux_loss + moe_aux)
    assert isinstance(state, AuxiliaryLosses)


def test_after_train_batch_moves_the_aux_free_bias():
    lm = _sosm_moe_lm(balance="aux_free")
    lm.model.encode(_batch()["tokens"])
    routed = [m for m in lm.model.modules() if isinstance(m, MoE)]
    loads = [m.stats["tokens_per_expert"].float() for m in routed]
    expected = [m.selection_bias + m.bias_update_rate * torch.sign(load.mean() - load) for m, load in zip(routed, loads)]
    after_train_batch(lm.model)
    for m, bias in zip(routed, expected):
        assert torch.equal(m.selection_bias, bias)
    assert any(bias.any() for bias in expected)


class Picky(nn.Module):
    def __init__(self, d_model: int, width: int = 3, legacy: bool = False) -> None:
        super().__init__()
        if width % 2:
            raise ComponentArgumentError("width", f"must be even, got {width}")
        if legacy:
            raise ValueError("legacy: a plain ValueError is reported as it reads")
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.proj(x)


@pytest.mark.parametrize(
    "mixer, message",
    [
        ({"type": "picky", "width": 5}, "model.arch.blocks.layer[0].mixer.width: must be even, got 5"),
        ({"type": "picky"}, "model.arch.blocks.layer[0].mixer: width: must be even, got 3"),  # a default the spec does not set
        ({"class_path": f"{__name__}.Picky", "init_args": {"width": 7}}, "model.arch.blocks.layer[0].mixer.init_args.width: must be even, got 7"),
        ({"type": "picky", "width": 2, "legacy": True}, "model.arch.blocks.layer[0].mixer: legacy: a plain ValueError is reported as it reads"),
        ({"type": "gqa", "num_heads": 4, "window": 0}, "model.arch.blocks.layer[0].mixer.window: must be positive or null, got 0"),
    ],
)
def test_typed_argument_error_names_the_full_key_path(monkeypatch, mixer, message):
    monkeypatch.setitem(REGISTRY["mixer"], "picky", Picky)
    arch = tiny_v1_arch()
    arch["blocks"]["layer"][0]["mixer"] = mixer
    with pytest.raises(SpecError) as e:
        build_model(arch)
    assert str(e.value) == message


def test_typed_argument_error_is_a_value_error():
    with pytest.raises(ValueError, match=r"^top_k: must be in 1..num_experts \(4\), got 9$") as e:
        MoE(8, 8, num_experts=4, top_k=9)
    assert (e.value.arg, e.value.reason) == ("top_k", "must be in 1..num_experts (4), got 9")
