"""soma_lightning.load: a trained model from a run directory, a checkpoint, a sharded folder or an export."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import soma_lightning
from soma_lightning import load
from soma_lightning.callbacks.safetensors_export import full_state, write_safetensors
from soma_lightning.checkpoints import load_module
from soma_lightning.cli import cli_main
from soma_lightning.errors import UserError
from soma_lightning.lm import SomaLM
from soma_lightning.spec import build_model, spec_from_dict
from soma_lightning.v1 import save_canonical, v1_spec
from conftest import run_config, tiny_v1_arch

TOKENS = torch.randint(0, 264, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny V1 run (d_model 32, 4 heads) of 4 steps: best-step=4.ckpt and last.ckpt."""
    tmp_path = tmp_path_factory.mktemp("load")
    cli_main(["fit", "--config", str(run_config(tmp_path, "tiny", 4, dropout=0.0))])
    return tmp_path / "runs" / "tiny" / "version_0"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_is_exported_from_the_package():
    assert soma_lightning.load is load and "load" in soma_lightning.__all__


def test_run_directory_and_checkpoints(run):
    last = run / "checkpoints" / "last.ckpt"
    reference = load_module(last)
    for path in (run, str(run), run / "checkpoints", last):
        module = load(path)
        assert isinstance(module, SomaLM) and not module.training and module.device.type == "cpu"
        _same_weights(module, reference)
    [best] = (run / "checkpoints").glob("best-*.ckpt")
    _same_weights(load(run, which="best"), load_module(best))
    assert torch.equal(load(run).model(TOKENS), reference.model.eval()(TOKENS))


def test_exported_files_of_both_layouts(run, tmp_path):
    module = load(run)
    for canonical in (False, True):
        out = tmp_path / f"{canonical}.safetensors"
        write_safetensors(module.model, full_state(module.model), module.arch, out, canonical)
        loaded = load(out)
        assert isinstance(loaded, SomaLM) and not loaded.training
        assert loaded.arch == module.arch  # the spec from the metadata, for either layout
        _same_weights(loaded.model, module.model)
        assert torch.equal(loaded.model(TOKENS), module.model(TOKENS))


def test_canonical_file_from_elsewhere_has_v1_heads_unless_its_metadata_says(tmp_path):
    source = build_model(v1_spec(16, 2, 32, num_heads=8))
    save_canonical(source, tmp_path / "plain.safetensors")
    loaded = load(tmp_path / "plain.safetensors")
    assert loaded.model.encoder.layers[0].attention.num_heads == 8
    _same_weights(loaded.model, source)
    save_canonical(source, tmp_path / "two.safetensors", metadata={"num_heads": "2"})
    assert load(tmp_path / "two.safetensors").model.encoder.layers[0].attention.num_heads == 2


def test_sharded_folder(tmp_path):
    import torch.distributed.checkpoint as dcp

    module = SomaLM(spec_from_dict(tiny_v1_arch()))
    folder = tmp_path / "last.ckpt"
    dcp.save({"model": module.state_dict()}, checkpoint_id=folder)
    torch.save({"hyper_parameters": dict(module.hparams), "global_step": 3}, folder / "meta.pt")
    _same_weights(load(folder), module)


def test_mistakes_are_one_line_user_errors(tmp_path):
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    cases = {
        tmp_path / "missing.ckpt": "does not exist",
        tmp_path / "missing.safetensors": "does not exist",
        tmp_path / "other.safetensors": "not a SOMA V1 canonical file, nor a soma-lightning state_dict export",
        tmp_path / "notes.txt": "is not a",
        tmp_path: "is neither a checkpoint nor a run directory",
    }
    for path, message in cases.items():
        with pytest.raises(UserError, match=message) as e:
            load(path)
        assert "\n" not in str(e.value) and str(e.value).startswith("path: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA devices")
def test_a_device_that_is_not_there(tmp_path):
    save_canonical(build_model(v1_spec(16, 1, 32, num_heads=4)), tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="^device: cuda asked for, but no CUDA device is available"):
        load(tmp_path / "w.safetensors", device="cuda")
