"""Weight-only int8 / int4 quantization (soma_lightning/quantize.py): logits of every architecture family
against the float model, against a plain dequantized reference, bits per byte of a trained model within the
issue's bounds, the export form and its round trip through soma_lightning.load, the CLI flags and errors."""

import copy
import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import soma_lightning
from soma_lightning import build_model, load_spec
from soma_lightning.data_modules.structure import batch_structure
from soma_lightning.errors import UserError
from soma_lightning.quantize import GROUP_SIZE, QUANTIZATION_KEY, quantize, quantized_state, skipped, weight_bytes
from soma_lightning.spec import spec_from_dict
from conftest import fresh_checkpoint, one_error_line, tiny_v1_arch

FAMILIES = ["specs/quickstart.yaml", "specs/gpt5_moe_tiny.yaml", "specs/hybrid_tiny.yaml", "specs/sosm_tiny.yaml"]
# Relative error (norm of the difference over norm of the float logits) of randomly initialised models; the
# measured values are near 0.005-0.017 (int8) and 0.07-0.13 (int4).
BOUNDS = {"int8": 0.03, "int4": 0.2}


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, structure=batch_structure(tokens))


def _dequantized(model: nn.Module) -> nn.Module:
    """The plain reference: a float copy whose Linear weights are the export form's codes times scales, by
    the formulas of quantize.py's docstring (not through torchao)."""
    tensors, metadata = quantized_state(model)
    info = json.loads(metadata[QUANTIZATION_KEY])
    state = {}
    for key in info["layers"]:
        qdata, scale = tensors.pop(f"{key}.qdata"), tensors.pop(f"{key}.scale").float()
        if info["mode"] == "int4":
            low, high = (qdata & 0x0F).float() - 8, (qdata >> 4).float() - 8
            codes = torch.stack([low, high], dim=-1).flatten(-2)
            state[key] = codes * scale.repeat_interleave(info["group_size"], dim=1)
        else:
            state[key] = qdata.float() * scale
    reference = copy.deepcopy(model)
    for key, weight in state.items():
        reference.get_submodule(key.removesuffix(".weight")).weight = nn.Parameter(weight)
    reference.load_state_dict(tensors, strict=False)
    return reference


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("spec", FAMILIES)
def test_every_family_quantizes_every_linear_and_stays_close_to_its_float_logits(spec, mode):
    model = build_model(load_spec(spec)).eval()
    tokens = torch.randint(0, 256, (2, 48))
    expected = _logits(model, tokens)
    embeddings = {name: m.weight.clone() for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    quantize(model, mode)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m.weight) is not nn.Parameter for m in linears)  # every width here divides by 32
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            assert type(m.weight) is nn.Parameter and torch.equal(m.weight, embeddings[name])
    error = ((_logits(model, tokens) - expected).norm() / expected.norm()).item()
    print(f"{spec} {mode}: relative logit error {error:.4f}")
    assert 0 < error < BOUNDS[mode]
    reference = _dequantized(model)
    torch.testing.assert_close(_logits(model, tokens), _logits(reference, tokens), rtol=1e-5, atol=1e-5)


def _shakespeare(split: slice) -> torch.Tensor:
    text = open("soma_lightning/corpora/tinyshakespeare.txt", "rb").read()
    return torch.tensor(list(text[split]), dtype=torch.long)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A small V1-shaped model trained briefly on tiny Shakespeare (a few seconds; one thread, which matmuls
    this small do not outgrow, and which a busy machine does not slow down by contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(spec_from_dict(tiny_v1_arch(d_model=32, n_layers=2, hidden_dim=128) | {"max_seq_len": 64}))
        data = _shakespeare(slice(0, 200_000))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(150):
            starts = torch.randint(0, len(data) - 65, (8,))
            batch = torch.stack([data[s : s + 65] for s in starts])
            loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _bits_per_byte(model: nn.Module) -> float:
    """Bits per byte on the last 16 KB of the text (outside the training bytes)."""
    data = _shakespeare(slice(-16_385, None))
    inputs, targets = data[:-1].view(-1, 64), data[1:].view(-1, 64)
    with torch.no_grad():
        return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item() / math.log(2)


@pytest.mark.parametrize("mode,bound", [("int8", 0.005), ("int4", 0.03)])
def test_bits_per_byte_of_a_trained_model_stay_within_the_issue_bounds(trained, mode, bound):
    baseline = _bits_per_byte(trained)
    assert baseline < 4  # trained: an untrained model is near 8
    quantized = _bits_per_byte(quantize(copy.deepcopy(trained), mode))
    print(f"{mode}: {baseline:.4f} -> {quantized:.4f} bits/byte ({quantized / baseline - 1:+.3%})")
    assert abs(quantized / baseline - 1) < bound


def test_int4_keeps_layers_the_group_size_does_not_divide():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 8))
    assert skipped(model, "int4") == ["2"] and skipped(model, "int8") == []
    quantize(model, "int4")
    assert [type(m.weight) is nn.Parameter for m in model] == [False, False, True]
    assert 48 % GROUP_SIZE != 0


def test_weight_bytes_count_codes_and_scales():
    model = nn.Linear(64, 32, bias=False)
    assert weight_bytes(model) == 64 * 32 * 4
    quantize(model, "int8")  # int8 codes, a float32 scale and an int8 zero point per row
    assert weight_bytes(model) == 64 * 32 + 32 * 4 + 32


def test_a_quantized_export_is_the_documented_form_and_loads_back_exactly(tmp_path, capsys):
    from soma_lightning.cli import main

    ckpt = fresh_checkpoint(tmp_path / "m.ckpt", tiny_v1_arch(d_model=64, hidden_dim=128))
    float_file, int4_file = tmp_path / "f.safetensors", tmp_path / "q4.safetensors"
    main(["export", "--ckpt", str(ckpt), "--out", str(float_file), "--layout", "state_dict"])
    main(["export", "--ckpt", str(ckpt), "--out", str(int4_file), "--quantize", "int4"])
    written = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert written["layout"] == "state_dict" and written["quantize"] == "int4"
    assert int4_file.stat().st_size < float_file.stat().st_size / 2.5  # the float embedding table stays
    with safe_open(str(int4_file), "pt") as f:
        info = json.loads(f.metadata()[QUANTIZATION_KEY])
        assert info["mode"] == "int4" and info["group_size"] == GROUP_SIZE and "predictor.weight" in info["layers"]
        qdata, scale = f.get_tensor("predictor.weight.qdata"), f.get_tensor("predictor.weight.scale")
        assert qdata.dtype == torch.uint8 and tuple(qdata.shape) == (264, 32) and tuple(scale.shape) == (264, 64 // GROUP_SIZE)
        assert "predictor.weight" not in f.keys() and "embedding.weight" in f.keys()
    expected = quantize(soma_lightning.load(ckpt).model, "int4")
    loaded = soma_lightning.load(int4_file).model
    assert type(loaded.predictor.weight) is type(expected.predictor.weight)
    tokens = torch.randint(0, 256, (2, 20))
    assert torch.equal(_logits(loaded, tokens), _logits(expected, tokens))


def test_a_tampered_quantized_export_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    from soma_lightning.cli.export import export_checkpoint

    ckpt = fresh_checkpoint(tmp_path / "m.ckpt", tiny_v1_arch(d_model=32, hidden_dim=64))
    out = tmp_path / "q8.safetensors"
    export_checkpoint(str(ckpt), str(out), quantize="int8")
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(out)
    del tensors["predictor.weight.scale"]
    save_file(tensors, str(out), metadata)
    with pytest.raises(UserError, match=r"^path: .*q8.safetensors: does not match the spec in its metadata"):
        soma_lightning.load(out)


def test_generate_takes_quantize(tmp_path, capsys):
    from soma_lightning.cli import main

    ckpt = fresh_checkpoint(tmp_path / "m.ckpt")
    main(["generate", "--ckpt", str(ckpt), "--prompt", "ab", "--max_new_tokens", "5", "--quantize", "int4"])
    assert "5 tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--layout", "canonical"], "--quantize: writes the state_dict layout .*--layout canonical holds float weights only"),
        (["--layout", "hf"], "--layout hf holds float weights only"),
        (["--strict_v1", "true"], "--strict_v1 checks the canonical V1 layout"),
        (["--format", "onnx"], "--quantize: applies to --format safetensors"),
    ],
)
def test_export_refuses_quantize_with_float_only_formats(capsys, tmp_path, flags, message):
    ckpt = fresh_checkpoint(tmp_path / "m.ckpt")
    line = one_error_line(capsys, "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "x"), "--quantize", "int8", *flags)
    assert re.search(message, line), line


def test_missing_torchao_is_one_line_with_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(UserError, match=r"^--quantize: needs torchao .*pip install 'soma-lightning\[quantize\]'$"):
        quantize(nn.Linear(32, 8), "int8")


def test_a_device_or_model_it_cannot_take_is_one_line():
    with pytest.raises(UserError, match=r"^--quantize int4: torchao's weight-only kernels run on cpu and cuda; the model is on meta$"):
        quantize(nn.Linear(32, 8, device="meta"), "int4")
    model = quantize(nn.Linear(32, 8), "int8")
    with pytest.raises(UserError, match="quantized already"):
        quantize(model, "int4")
    with pytest.raises(UserError, match=r"^--quantize: expected one of int8, int4, got 'int3'$"):
        quantize(nn.Linear(32, 8), "int3")
