"""SafetensorsExport through the CLI: one file per checkpointed step, the newest kept, the V1 canonical layout
for V1 models and otherwise a state dict that rebuilds the model from its own metadata; failed writes."""

from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn

from soma_lightning.callbacks import safetensors_export
from soma_lightning.callbacks.safetensors_export import SafetensorsExport, load_exported
from soma_lightning.cli import cli_main, main
from soma_lightning.lm import SomaLM
from soma_lightning.spec import build_model, spec_from_dict
from soma_lightning.v1 import WeightsError, model_from_canonical
from conftest import tiny_v1_arch
from conftest import run_config


def _gqa_arch() -> dict:
    """A tiny model that is not V1: grouped-query attention and an RMSNorm before the predictor."""
    arch = tiny_v1_arch(d_model=32, hidden_dim=64) | {"final_norm": "rmsnorm"}
    arch["blocks"]["layer"][0]["mixer"] = {"type": "gqa", "num_heads": 4, "num_kv_heads": 2}
    return arch


def _fit(tmp_path: Path, name: str, arch: dict, steps: int, **export_args) -> Path:
    """Train `arch` for `steps` steps through the CLI without validation, saving `step=N.ckpt` and last.ckpt
    every 2 steps, with the export callback; the run directory."""
    path = run_config(tmp_path, name, steps)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["arch"] = arch
    cfg["checkpoint"] = {"monitor": None, "every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}"}
    callback = {"class_path": "soma_lightning.callbacks.safetensors_export.SafetensorsExport", "init_args": export_args}
    cfg["trainer"] |= {"limit_val_batches": 0, "callbacks": [callback]}
    path.write_text(yaml.safe_dump(cfg))
    cli_main(["fit", "--config", str(path)])
    return tmp_path / "runs" / name / "version_0"


def _model_of(ckpt: Path) -> nn.Module:
    return SomaLM.load_from_checkpoint(ckpt, map_location="cpu").model.eval()


def test_state_dict_export_keeps_the_newest_and_rebuilds_the_model(tmp_path, monkeypatch):
    writes = []
    atomic_write = safetensors_export.atomic_write

    def counted(path: Path, write) -> None:
        writes.append(path.name)
        atomic_write(path, write)

    monkeypatch.setattr(safetensors_export, "atomic_write", counted)
    run = _fit(tmp_path, "gqa", _gqa_arch(), 6, keep_last=2)
    # step=N.ckpt and last.ckpt are saved at each of these steps, the export once per step
    assert writes == ["step=2.safetensors", "step=4.safetensors", "step=6.safetensors"]
    exported = run / "safetensors"
    assert sorted(p.name for p in exported.iterdir()) == ["step=4.safetensors", "step=6.safetensors"]
    tokens = torch.randint(0, 264, (2, 16))
    for step in (4, 6):
        path, ckpt = exported / f"step={step}.safetensors", run / "checkpoints" / f"step={step}.ckpt"
        tensors, spec = load_exported(path)
        weights = {k.removeprefix("model."): v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
        assert tensors.keys() == weights.keys() and all(torch.equal(tensors[k], v) for k, v in weights.items())
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["global_step"] == str(step)
        assert asdict(spec) == asdict(spec_from_dict(_gqa_arch()))
        model = build_model(spec)
        model.load_state_dict(tensors)
        assert torch.equal(model.eval()(tokens), _model_of(ckpt)(tokens))


def test_v1_model_exports_the_canonical_layout(tmp_path):
    run = _fit(tmp_path, "v1", tiny_v1_arch(d_model=32, hidden_dim=64), 2)
    path = run / "safetensors" / "step=2.safetensors"
    tokens = torch.randint(0, 264, (2, 16))
    logits = model_from_canonical(path, num_heads=4)(tokens)
    torch.testing.assert_close(logits, _model_of(run / "checkpoints" / "last.ckpt")(tokens), rtol=1e-5, atol=1e-5)
    assert load_exported(path)[1] is None


def test_failed_write_keeps_the_previous_export_and_leaves_no_tmp(tmp_path, monkeypatch):
    save_file = safetensors_export.save_file

    def full_disk_at_step_4(tensors: dict, filename: str, metadata: dict) -> None:
        if metadata["global_step"] == "4":
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full")
        save_file(tensors, filename, metadata)

    monkeypatch.setattr(safetensors_export, "save_file", full_disk_at_step_4)
    with pytest.raises(OSError, match="disk full"):
        _fit(tmp_path, "full", _gqa_arch(), 4, keep_last=1)
    run = tmp_path / "runs" / "full" / "version_0"
    assert [p.name for p in (run / "safetensors").iterdir()] == ["step=2.safetensors"]
    tensors, _ = load_exported(run / "safetensors" / "step=2.safetensors")
    assert all(torch.equal(tensors[k], v) for k, v in _model_of(run / "checkpoints" / "step=2.ckpt").state_dict().items())


@pytest.mark.parametrize("args", [{"keep_last": 0}, {"keep_last": 1.5}, {"keep_last": True}, {"layout": "v1"}])
def test_bad_arguments_name_the_argument(args):
    with pytest.raises(ValueError, match=f"^{next(iter(args))}: "):
        SafetensorsExport(**args)


def test_canonical_layout_refuses_a_model_that_is_not_v1_at_setup(tmp_path):
    callback = SafetensorsExport(layout="canonical")
    with pytest.raises(WeightsError, match=r"^SafetensorsExport\(layout='canonical'\): layer 0 has a gqa mixer; .*; use layout 'state_dict' or 'auto'$"):
        callback.setup(L.Trainer(logger=False, default_root_dir=tmp_path), SomaLM(spec_from_dict(_gqa_arch())), "fit")


def test_tied_weights_are_written_under_each_name(tmp_path):
    module = SomaLM(spec_from_dict(_gqa_arch()))
    module.model.predictor.weight = module.model.embedding.weight
    trainer, callback = L.Trainer(logger=False, default_root_dir=tmp_path), SafetensorsExport()
    callback.setup(trainer, module, "fit")
    callback.on_save_checkpoint(trainer, module, {})
    tensors, _ = load_exported(tmp_path / "safetensors" / "step=0.safetensors")
    for key in ("predictor.weight", "embedding.weight"):
        assert torch.equal(tensors[key], module.model.embedding.weight)


def test_export_consolidates_an_fsdp1_sharded_folder(tmp_path):
    """Lightning's FSDPStrategy (FSDP1, state_dict_type sharded) stores the weights under "model" in a
    torch.distributed.checkpoint folder beside meta.pt; FSDP2's ModelParallelStrategy under "state_dict" (its
    export is tested on 2 processes in test_scale_out.py)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    module = SomaLM(spec_from_dict(tiny_v1_arch()))
    folder = tmp_path / "last.ckpt"
    dcp.save({"model": module.state_dict()}, checkpoint_id=folder)
    torch.save({"hyper_parameters": dict(module.hparams), "global_step": 3}, folder / "meta.pt")
    main(["export", "--ckpt", str(folder), "--out", str(tmp_path / "w.safetensors"), "--layout", "state_dict"])
    exported = load_file(tmp_path / "w.safetensors")
    for name, value in module.model.state_dict().items():
        assert torch.equal(exported[name], value), name
