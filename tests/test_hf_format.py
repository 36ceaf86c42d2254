"""The Hugging Face format (hf_format.py): a V1-shaped model as a transformers GPT-NeoX directory, whose logits
equal ours, read back bitwise; what it cannot hold, and pickled weights, refused in one line."""

import json
import pickle
import sys

import pytest
import torch
from transformers import GPTNeoXForCausalLM

import soma_lightning
from soma_lightning.cli import main
from soma_lightning.generation import generate
from soma_lightning.hf_format import HFFormatError, from_transformers, save_transformers, to_transformers
from soma_lightning.nn.model import SomaModel
from soma_lightning.spec import ModelSpec, build_model, load_spec, spec_from_dict
from soma_lightning.vocabulary import BYTE_EOS, BYTE_PAD
from conftest import fresh_checkpoint, one_error_line, tiny_v1_arch

SPECS = {"tiny": lambda: spec_from_dict(tiny_v1_arch()), "quickstart": lambda: load_spec("specs/quickstart.yaml")}


def _random_v1(spec: ModelSpec) -> SomaModel:
    """Every parameter moved off its initial value (biases non-zero, LayerNorm gains off 1), except the
    predictor's bias, which is zero: GPT-NeoX's output layer has none."""
    model = build_model(spec).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if model.predictor.bias is not None:
            model.predictor.bias.zero_()
    return model


def _assert_bitwise(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype == torch.float32 and torch.equal(value.view(torch.int32), theirs[key].view(torch.int32)), key


@pytest.mark.parametrize("name", SPECS)
def test_transformers_logits_equal_ours_and_the_import_is_bitwise(tmp_path, name):
    model = _random_v1(SPECS[name]())
    save_transformers(model, tmp_path / "hf")
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 264, (2, 200))  # positions far past the first few: RoPE's convention and base
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert theirs.dtype == torch.float32 and ours.abs().max() > 1  # logits of order 1: an absolute bound means something
    assert (theirs - ours).abs().max() <= 1e-5  # max absolute difference
    _assert_bitwise(from_transformers(tmp_path / "hf").state_dict(), model.state_dict())


def test_rope_base_and_eps_travel_and_missing_biases_are_written_as_zeros(tmp_path):
    arch = tiny_v1_arch(rope_base=500.0, bias=False) | {"predictor_bias": False, "final_norm": {"type": "layernorm", "eps": 1e-6}}
    for sublayer in arch["blocks"]["layer"]:
        sublayer["norm"] = arch["final_norm"]
    model = _random_v1(spec_from_dict(arch))
    save_transformers(model, tmp_path / "hf")
    hf, back = GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf").eval(), from_transformers(tmp_path / "hf")
    tokens = torch.randint(0, 264, (2, 100))
    with torch.no_grad():
        ours = model(tokens)
        assert (hf(tokens).logits - ours).abs().max() <= 1e-5
        assert (back(tokens) - ours).abs().max() <= 1e-6  # V1's biases, zero, where the model had none
    assert back.encoder.layers[0].attention.rope_base == 500.0 and back.final_norm.eps == 1e-6
    assert not back.encoder.layers[0].attention.query.bias.any() and not back.predictor.bias.any()


def test_greedy_generation_is_the_same_and_a_directory_transformers_wrote_imports_bitwise(tmp_path):
    model = _random_v1(SPECS["quickstart"]())
    hf = to_transformers(model)
    prompt = torch.randint(0, 256, (1, 40))
    ours = generate(model, prompt, 12).tokens[0]
    # ours emits byte ids and EOS only, and stops at EOS: the same ids on the transformers side
    others = [BYTE_PAD] + list(range(BYTE_EOS + 1, 264))
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, suppress_tokens=others)
    assert ours == theirs[0, prompt.shape[1] :].tolist()
    hf.save_pretrained(tmp_path / "saved")  # config.json in the installed transformers' own spelling
    _assert_bitwise(from_transformers(tmp_path / "saved").state_dict(), model.state_dict())


def test_cli_writes_a_run_as_transformers_and_reads_it_back(capsys, tmp_path):
    ckpt = fresh_checkpoint(tmp_path / "run.ckpt", tiny_v1_arch() | {"predictor_bias": False})
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--layout", "hf"])
    assert json.loads(capsys.readouterr().out)["layout"] == "hf"
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    # back to SOMA V1's canonical file: the run's tensors, with the V1 predictor bias as zeros
    main(["export", "--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path / "v1.safetensors"), "--layout", "canonical"])
    assert json.loads(capsys.readouterr().out)["layout"] == "canonical"
    state = soma_lightning.load(tmp_path / "v1.safetensors").model.state_dict()
    assert torch.equal(state.pop("predictor.bias"), torch.zeros(264))
    _assert_bitwise(state, soma_lightning.load(ckpt).model.state_dict())
    hf_state = soma_lightning.load(tmp_path / "hf").model.state_dict()  # soma_lightning.load reads the directory too
    assert torch.equal(hf_state.pop("predictor.bias"), torch.zeros(264))
    _assert_bitwise(hf_state, soma_lightning.load(ckpt).model.state_dict())


def test_a_model_gpt_neox_cannot_hold_is_refused_in_one_line(capsys, tmp_path):
    gqa = tiny_v1_arch()
    gqa["blocks"]["layer"][0]["mixer"] = {"type": "gqa", "num_heads": 4, "num_kv_heads": 2}
    line = one_error_line(capsys, "export", "--ckpt", str(fresh_checkpoint(tmp_path / "gqa.ckpt", gqa)), "--out", str(tmp_path / "a"), "--layout", "hf")
    assert "gqa mixer" in line and "V1-shaped models only" in line and "--layout state_dict" in line and "soma_lightning.load" in line
    # PyTorch's default initialisation gives the predictor a non-zero bias
    line = one_error_line(capsys, "export", "--ckpt", str(fresh_checkpoint(tmp_path / "v1.ckpt")), "--out", str(tmp_path / "b"), "--layout", "hf")
    assert "predictor.bias is non-zero" in line and "predictor_bias: false" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pickled_weights_and_configs_v1_cannot_compute_are_refused_in_one_line(capsys, tmp_path):
    save_transformers(_random_v1(SPECS["tiny"]()), tmp_path / "hf")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    line = one_error_line(capsys, "export", "--ckpt", str(pickled), "--out", str(tmp_path / "out.safetensors"))
    assert "only pytorch_model.bin, a pickle" in line and "safe_serialization=True" in line
    assert not marker.exists()
    config = json.loads((tmp_path / "hf" / "config.json").read_text()) | {"use_parallel_residual": True}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFFormatError, match=r"use_parallel_residual is True, not V1's False") as refused:
        from_transformers(tmp_path / "hf")
    assert "\n" not in str(refused.value)


def test_a_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(HFFormatError, match=r"pip install 'soma-lightning\[hf\]'"):
        to_transformers(_random_v1(SPECS["tiny"]()))
