"""`soma-lightning export --format onnx` (soma_lightning/onnx_export.py): ONNX Runtime's logits against the
model's in float32, dynamic batch and sequence axes, the external-data form, and the refusals."""

import json
import sys

import pytest
import torch
import yaml

import soma_lightning
from soma_lightning.errors import UserError
from soma_lightning.onnx_export import export_onnx, onnx_logits
from conftest import fresh_checkpoint, one_error_line, tiny_v1_arch

ARCH = tiny_v1_arch(d_model=32, n_layers=2, num_heads=4, hidden_dim=128) | {"max_seq_len": 64}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple:
    """A V1-shaped checkpoint (quickstart's structure, smaller), its ONNX export through the CLI, and what the
    command printed."""
    from soma_lightning.cli.export import export_checkpoint

    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    ckpt = fresh_checkpoint(folder / "m.ckpt", ARCH)
    model = soma_lightning.load(ckpt).model
    with torch.no_grad():  # logits far from zero, so that 1e-4 is a real bound
        for p in model.parameters():
            p.normal_(0, 0.3)
    torch.save({**torch.load(ckpt, weights_only=True), "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    out = folder / "m.onnx"
    written = export_checkpoint(str(ckpt), str(out), format="onnx")
    return ckpt, out, written


@pytest.mark.parametrize("shape", [(1, 1), (2, 17), (3, 64)])
def test_onnxruntime_logits_match_the_model_in_float32(exported, shape):
    ckpt, out, _ = exported
    model = soma_lightning.load(ckpt).model
    tokens = torch.randint(0, 264, shape)
    with torch.no_grad():
        expected = model(tokens)
    assert expected.abs().max() > 1  # the bound below is not met by logits that are all near zero
    got = torch.from_numpy(onnx_logits(out, tokens))
    assert got.shape == expected.shape  # batch and sequence are dynamic: none of these is the traced (2, 16)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_the_command_reports_what_it_wrote(exported):
    _, out, written = exported
    assert written["format"] == "onnx" and written["out"] == str(out) and written["external_data"] is False
    assert written["onnxruntime_max_abs_diff"] < 1e-4 and written["opset"] >= 18


def test_weights_in_an_external_data_file_load_too(tmp_path):
    model = soma_lightning.load(fresh_checkpoint(tmp_path / "m.ckpt", ARCH)).model
    out = tmp_path / "m.onnx"
    written = export_onnx(model, out, 64, external_data=True)
    weights = sum(p.nbytes for p in model.parameters())  # less the tensors under 1 KB, which stay inline
    assert 0.9 * weights < (tmp_path / "m.onnx.data").stat().st_size <= weights
    assert written["onnxruntime_max_abs_diff"] < 1e-4
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("spec", ["specs/sosm_tiny.yaml", "specs/hybrid_tiny.yaml"])
def test_other_architectures_are_refused_in_one_line(capsys, tmp_path, spec):
    ckpt = fresh_checkpoint(tmp_path / "m.ckpt", yaml.safe_load(open(spec))["model"]["arch"])
    line = one_error_line(capsys, "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--format", "onnx")
    assert "--format onnx: exports V1-shaped models only; " in line and line.endswith("; use --format safetensors"), line
    assert not (tmp_path / "m.onnx").exists()


def test_safetensors_flags_are_refused_with_onnx(capsys, tmp_path):
    ckpt = fresh_checkpoint(tmp_path / "m.ckpt", ARCH)
    line = one_error_line(capsys, "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--format", "onnx", "--layout", "canonical")
    assert line.endswith("--format onnx: writes one .onnx file; --layout canonical applies to --format safetensors"), line


def test_missing_onnxscript_is_one_line_with_the_extra(monkeypatch, tmp_path):
    model = soma_lightning.load(fresh_checkpoint(tmp_path / "m.ckpt", ARCH)).model
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(UserError, match=r"^--format onnx: needs onnx and onnxscript .*pip install 'soma-lightning\[onnx\]'$"):
        export_onnx(model, tmp_path / "m.onnx", 64)


def test_the_cli_prints_json(capsys, exported, tmp_path):
    from soma_lightning.cli import main

    ckpt, _, _ = exported
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "cli.onnx"), "--format", "onnx"])
    assert json.loads(capsys.readouterr().out)["format"] == "onnx"
