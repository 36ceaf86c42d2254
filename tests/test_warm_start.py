"""--model.init_weights: a model starts from an export of any spec or from V1's canonical file, strictly by
default (one line naming what does not fit), or loading what matches (growing a model); checkpoints and other
files are refused in one line."""

import copy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from soma_lightning import load_spec
from soma_lightning.callbacks.safetensors_export import full_state, write_safetensors
from soma_lightning.checkpoints import hparams_differences
from soma_lightning.cli import main
from soma_lightning.cli.export import export_checkpoint
from soma_lightning.lm import SomaLM
from soma_lightning.spec import spec_from_dict
from soma_lightning.v1 import WeightsError
from soma_lightning.warm_start import load_initial_weights
from conftest import fresh_checkpoint, one_error_line, tiny_v1_arch

LAYOUTS = {"quickstart": "canonical", "gpt5_moe_tiny": "state_dict", "hybrid_tiny": "state_dict", "sosm_tiny": "state_dict"}


def _arch(name: str) -> dict:
    return yaml.safe_load(open(f"specs/{name}.yaml"))["model"]["arch"]


def _export(tmp_path: Path, arch: dict, name: str = "w") -> tuple[Path, dict[str, torch.Tensor], str]:
    """`soma-lightning export` (layout auto) of a fresh checkpoint of `arch`: the file, the model's state dict
    and the layout written."""
    ckpt = fresh_checkpoint(tmp_path / f"{name}.ckpt", arch)
    out = tmp_path / f"{name}.safetensors"
    written = export_checkpoint(str(ckpt), str(out))
    state = {k.removeprefix("model."): v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    return out, state, written["layout"]


def _error(arch: dict, path: Path, strict: bool = True) -> str:
    with pytest.raises(WeightsError) as e:
        SomaLM(spec_from_dict(arch), init_weights=str(path), init_weights_strict=strict)
    message = str(e.value)
    assert "\n" not in message and message.startswith("model.init_weights: ")
    return message


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_architecture_starts_from_its_export_bitwise(tmp_path, name):
    path, source, layout = _export(tmp_path, _arch(name))
    assert layout == LAYOUTS[name]
    torch.manual_seed(1)  # another initialisation than the source's, which the file must replace
    module = SomaLM(load_spec(f"specs/{name}.yaml"), init_weights=str(path))
    state = module.model.state_dict()
    assert state.keys() == source.keys()
    for key, value in source.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    torch.manual_seed(1)
    fresh = SomaLM(load_spec(f"specs/{name}.yaml")).model.state_dict()
    assert any(not torch.equal(fresh[key], value) for key, value in source.items())


def test_strict_names_missing_unexpected_and_misshaped_in_one_line(tmp_path):
    arch = _arch("gpt5_moe_tiny")
    model = SomaLM(spec_from_dict(arch)).model
    path = tmp_path / "w.safetensors"
    save_file(full_state(model) | {"stray.weight": torch.zeros(2)}, str(path))  # no metadata: taken by its keys
    grown = copy.deepcopy(arch) | {"n_layers": 3}
    grown["blocks"]["layer"][1]["ffn"]["hidden_dim"] = 32
    message = _error(grown, path)
    assert message.startswith(f"model.init_weights: {path} does not fit the model: 13 missing (encoder.layers.2.norm_1.weight, ")
    assert ", 1 unexpected (stray.weight), 4 mis-shaped (encoder.layers.0.moe.w_in has shape [4, 64, 128] in the file, [4, 64, 64] in the model; " in message
    assert message.endswith("; …); pass --model.init_weights_strict false to load what matches")


def test_strict_refuses_a_smaller_model_and_a_v1_file_of_another_size(tmp_path):
    path, _, _ = _export(tmp_path, _arch("gpt5_moe_tiny"))
    assert "does not fit the model: 13 unexpected (encoder.layers.1." in _error(_arch("gpt5_moe_tiny") | {"n_layers": 1}, path)
    v1, _, _ = _export(tmp_path, tiny_v1_arch(), "v1")
    assert "34 mis-shaped (embedding.weight has shape [264, 16] in the file, [264, 32] in the model; " in _error(tiny_v1_arch(d_model=32), v1)


@pytest.mark.parametrize("arch", [_arch("gpt5_moe_tiny"), tiny_v1_arch()], ids=["state_dict", "canonical"])
def test_non_strict_grows_a_model(tmp_path, arch):
    path, source, layout = _export(tmp_path, arch)
    grown = spec_from_dict(arch | {"n_layers": 3})
    torch.manual_seed(1)
    init = SomaLM(grown).model.state_dict()
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match=r"model.init_weights: loaded \d+ of the model's \d+ tensors from .*; not loaded: \d+ missing \(encoder\.layers\.2\."):
        module = SomaLM(grown, init_weights=str(path), init_weights_strict=False)
    state = module.model.state_dict()
    new = [key for key in state if key.startswith("encoder.layers.2.")]
    assert new and all(torch.equal(state[key], init[key]) for key in new)  # the new layer keeps its initialisation
    assert all(torch.equal(state[key], value) for key, value in source.items())
    with pytest.warns(UserWarning, match="not loaded"):
        report = load_initial_weights(module.model, path, strict=False)
    assert report.layout == layout and report.missing == new and not report.unexpected and not report.misshaped


def test_canonical_head_count_must_be_the_models(tmp_path):
    path, _, _ = _export(tmp_path, tiny_v1_arch(num_heads=4))  # the export records 4 heads in its metadata
    for strict in (True, False):
        assert _error(tiny_v1_arch(num_heads=2), path, strict) == (
            f"model.init_weights: {path} records 4 attention heads, the model has 2; set the mha mixer's num_heads to 4"
        )


def test_checkpoints_and_other_files_are_refused_in_one_line(tmp_path):
    ckpt = fresh_checkpoint(tmp_path / "run" / "last.ckpt")
    export = "write its weights with `soma-lightning export --ckpt"
    assert export in _error(tiny_v1_arch(), ckpt) and "is a checkpoint, not a safetensors file" in _error(tiny_v1_arch(), ckpt)
    pickle = tmp_path / "model.bin"
    pickle.write_bytes(ckpt.read_bytes())
    assert "is a checkpoint, not a safetensors file" in _error(tiny_v1_arch(), pickle)
    assert "is a folder, not a safetensors file" in _error(tiny_v1_arch(), ckpt.parent)
    assert _error(tiny_v1_arch(), tmp_path / "none.safetensors") == f"model.init_weights: {tmp_path / 'none.safetensors'} does not exist"
    text = tmp_path / "notes.safetensors"
    text.write_text("not tensors")
    assert f"model.init_weights: {text} is not a readable safetensors file (" in _error(tiny_v1_arch(), text)


def test_init_weights_strict_may_differ_on_resume():
    hparams = dict(SomaLM(spec_from_dict(tiny_v1_arch())).hparams)
    older = {key: value for key, value in hparams.items() if key != "init_weights_strict"}  # saved before the flag
    assert hparams_differences(older, hparams | {"init_weights": "w.safetensors", "init_weights_strict": False}) == []


def _fit_config(tmp_path: Path) -> Path:
    """gpt5_moe_tiny on 60 KB of tiny Shakespeare with one validation batch, logging to tmp_path/runs."""
    cfg = yaml.safe_load(open("specs/gpt5_moe_tiny.yaml"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open("soma_lightning/corpora/tinyshakespeare.txt").read()[:60_000])
    cfg["data"]["init_args"] |= {"source": str(corpus), "batch_size": 2, "val_batch_size": 2}
    cfg["trainer"] |= {"val_check_interval": 1, "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False}
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "warm"}}
    path = tmp_path / "warm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_starts_from_the_file(tmp_path, capsys):
    module = SomaLM(load_spec("specs/gpt5_moe_tiny.yaml"))
    path = tmp_path / "w.safetensors"
    write_safetensors(module.model, full_state(module.model), module.arch, path, canonical=False)
    config = _fit_config(tmp_path)
    # lr 0: the one step leaves the parameters as they started
    main(["fit", "--config", str(config), "--model.init_weights", str(path), "--trainer.max_steps", "1", "--model.optim.lr", "0"])
    saved = torch.load(tmp_path / "runs/warm/version_0/checkpoints/last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["init_weights"] == str(path)
    for key, value in module.model.named_parameters():
        assert torch.equal(saved["state_dict"][f"model.{key}"], value), key
    capsys.readouterr()
    line = one_error_line(capsys, "fit", "--config", str(config), "--model.init_weights", str(path), "--model.arch.n_layers", "3")
    assert line.startswith(f"soma-lightning: error: model.init_weights: {path} does not fit the model: 13 missing (")
