"""What a user of `export` and `score` sees: exports record their head count and `score` uses it; a model the
canonical layout cannot hold is refused by name; exports get the mode checkpoints get; a progress bar; a CUDA
device on a CPU-only torch is one line."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from soma_lightning.callbacks.safetensors_export import CANONICAL_SPEC_KEY, SafetensorsExport, is_v1, load_exported
from soma_lightning.checkpoint_io import AtomicCheckpointIO
from soma_lightning.cli import main
from soma_lightning.lm import SomaLM
from soma_lightning.spec import build_model, spec_from_dict
from soma_lightning.onchain import V1_SEQ_LEN, describe_scoring, score
from soma_lightning.v1 import (
    NUM_HEADS_KEY, V1_NUM_HEADS, WeightsError, file_num_heads, file_size, model_from_canonical, resolve_num_heads, save_canonical, v1_spec,
)
from conftest import fresh_checkpoint, one_error_line, tiny_v1_arch


def _sosm_arch() -> dict:
    return yaml.safe_load(open("specs/sosm_tiny.yaml"))["model"]["arch"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 9)  # 3 rows of 1024: one batch
    return path


# 1. The head count travels with an export.


def test_canonical_export_records_its_head_count_and_spec_and_keeps_the_tensors(capsys, tmp_path):
    ckpt = fresh_checkpoint(tmp_path / "m.ckpt", tiny_v1_arch(num_heads=4))
    out = tmp_path / "m.safetensors"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--layout", "canonical"])
    assert json.loads(capsys.readouterr().out)["layout"] == "canonical"
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata[NUM_HEADS_KEY] == "4" and file_num_heads(out) == 4
    assert json.loads(metadata[CANONICAL_SPEC_KEY]) == asdict(spec_from_dict(tiny_v1_arch(num_heads=4)))
    # the tensors are those of a canonical file without metadata (the network's loaders read only these)
    model = SomaLM.load_from_checkpoint(ckpt, map_location="cpu").model
    save_canonical(model, tmp_path / "plain.safetensors")
    plain, exported = load_file(tmp_path / "plain.safetensors"), load_file(out)
    assert plain.keys() == exported.keys() and all(torch.equal(plain[k], exported[k]) for k in plain)
    assert file_num_heads(tmp_path / "plain.safetensors") is None
    assert load_exported(out)[1] is None  # not mistaken for a state_dict export


def test_head_count_comes_from_the_metadata_and_a_contradiction_is_refused(tmp_path):
    model = build_model(v1_spec(16, 2, 32, num_heads=4))
    recorded, plain = tmp_path / "recorded.safetensors", tmp_path / "plain.safetensors"
    save_canonical(model, recorded, metadata={NUM_HEADS_KEY: "4"})
    save_canonical(model, plain)
    assert resolve_num_heads(recorded) == 4 and resolve_num_heads(recorded, 4) == 4
    assert resolve_num_heads(plain) == V1_NUM_HEADS and resolve_num_heads(plain, 4) == 4
    assert file_size(recorded)[4] == 4 and file_size(plain, 2)[4] == 2
    assert model_from_canonical(recorded).encoder.layers[0].attention.num_heads == 4
    with pytest.raises(WeightsError) as e:
        resolve_num_heads(recorded, 8)
    assert str(e.value) == f"--num_heads 8 contradicts {recorded}, whose metadata records 4 heads; drop --num_heads or pass 4"
    with pytest.raises(WeightsError, match="--num_heads 2 contradicts"):
        model_from_canonical(recorded, 2)
    save_canonical(model, tmp_path / "bad.safetensors", metadata={NUM_HEADS_KEY: "four"})
    with pytest.raises(WeightsError, match=r"bad.safetensors: its metadata num_heads='four' is not a positive number of heads"):
        resolve_num_heads(tmp_path / "bad.safetensors")


def test_score_refuses_num_heads_that_contradict_an_export(capsys, tmp_path, data):
    ckpt, out = fresh_checkpoint(tmp_path / "m.ckpt", tiny_v1_arch(num_heads=4)), tmp_path / "m.safetensors"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--layout", "canonical"])
    capsys.readouterr()
    line = one_error_line(capsys, "score", "--weights", str(out), "--data", str(data), "--num_heads", "2")
    assert line == f"soma-lightning: error: --num_heads 2 contradicts {out}, whose metadata records 4 heads; drop --num_heads or pass 4"


def test_score_of_a_4_head_export_uses_4_heads_without_num_heads(capsys, tmp_path, data):
    ckpt, out = fresh_checkpoint(tmp_path / "m.ckpt", tiny_v1_arch(num_heads=4)), tmp_path / "m.safetensors"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--layout", "canonical"])
    capsys.readouterr()
    main(["score", "--weights", str(out), "--data", str(data)])
    expected, _ = score(model_from_canonical(out, 4), data.read_bytes())
    assert json.loads(capsys.readouterr().out)["loss"] == expected.loss


# 2. Progress.


def test_progress_bar_goes_to_stderr_and_changes_no_number(capsys):
    model = build_model(v1_spec(16, 2, 32, num_heads=4)).eval()
    data = bytes(range(256)) * 4 * 20  # 20 rows: batches of 16 and 4
    quiet, quiet_embedding = score(model, data, seed=3)
    assert capsys.readouterr().err == ""
    loud, loud_embedding = score(model, data, seed=3, progress=True)
    err = capsys.readouterr().err
    assert "score" in err and "2/2" in err and "loss=" in err
    assert loud == quiet and torch.equal(loud_embedding, quiet_embedding)
    assert describe_scoring(len(data)) == f"scoring 20,480 bytes as 20 rows of {V1_SEQ_LEN} bytes (the scorer's row length) in 2 batches of 16"


# 3. File modes.


def test_callback_exports_get_the_mode_checkpoints_get(tmp_path):
    """safetensors writes through a private 0600 temp file; exports get 0666 less the umask, as torch.save's
    checkpoints (AtomicCheckpointIO) do."""
    previous = os.umask(0o022)
    try:
        for umask in (0o022, 0o027):
            os.umask(umask)
            for arch in (tiny_v1_arch(), tiny_v1_arch() | {"final_norm": "rmsnorm"}):  # canonical, state_dict
                folder = tmp_path / f"{umask:o}-{len(list(tmp_path.iterdir()))}"
                module = SomaLM(spec_from_dict(arch))
                trainer, callback = L.Trainer(logger=False, default_root_dir=folder), SafetensorsExport(dirpath=str(folder))
                callback.setup(trainer, module, "fit")
                callback.on_save_checkpoint(trainer, module, {})
                AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, folder / "c.ckpt")
                modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
                assert modes == {"step=0.safetensors": oct(0o666 & ~umask), "c.ckpt": oct(0o666 & ~umask)}, modes
    finally:
        os.umask(previous)


# 4. Models the canonical layout cannot hold.


def test_canonical_export_of_a_sosm_model_names_what_is_missing(capsys, tmp_path):
    ckpt, out = fresh_checkpoint(tmp_path / "sosm.ckpt", _sosm_arch()), tmp_path / "sosm.safetensors"
    line = one_error_line(capsys, "export", "--ckpt", str(ckpt), "--out", str(out), "--layout", "canonical")
    assert line == (
        "soma-lightning: error: --layout canonical: the model has a semantic_state token embedding; the canonical V1 layout "
        "holds only a plain token table, pre-norm LayerNorm layers of multi-head attention (mha) and a GELU MLP (gelu_mlp), "
        "a final LayerNorm and a biased predictor; use --layout state_dict"
    )
    assert not out.exists()
    line = one_error_line(capsys, "export", "--ckpt", str(ckpt), "--out", str(out), "--strict_v1")
    assert line.startswith(f"soma-lightning: error: --strict_v1: {ckpt}: the model is not SOMA V1-shaped: the model has a semantic_state token embedding")
    # auto picks the state dict, which rebuilds the model
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    assert json.loads(capsys.readouterr().out)["layout"] == "state_dict"
    tensors, spec = load_exported(out)
    assert spec.token_embedding["type"] == "semantic_state"
    build_model(spec).load_state_dict(tensors)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda a: a["blocks"]["layer"][0]["mixer"].update(type="gqa", num_kv_heads=2), "layer 0 has a gqa mixer"),
        (lambda a: a["blocks"]["layer"][1].update(ffn={"type": "moe", "num_experts": 2, "top_k": 1, "hidden_dim": 16}), "layer 0 has a moe feed-forward"),
        (lambda a: a["blocks"]["layer"][0].update(norm="rmsnorm"), "layer 0 has a RMSNorm before its attention, not a LayerNorm"),
        (lambda a: a.update(final_norm="rmsnorm"), "the model's final norm is RMSNorm, not a LayerNorm"),
    ],
    ids=["gqa", "moe", "rmsnorm", "final_rmsnorm"],
)
def test_other_architectures_are_refused_by_name_and_auto_exports_their_state_dict(capsys, tmp_path, change, problem):
    arch = tiny_v1_arch()
    change(arch)
    ckpt, out = fresh_checkpoint(tmp_path / "m.ckpt", arch), tmp_path / "m.safetensors"
    line = one_error_line(capsys, "export", "--ckpt", str(ckpt), "--out", str(out), "--layout", "canonical")
    assert line.startswith(f"soma-lightning: error: --layout canonical: {problem}; the canonical V1 layout holds only ") and line.endswith("; use --layout state_dict")
    assert not is_v1(SomaLM(spec_from_dict(arch)).model)
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    assert json.loads(capsys.readouterr().out)["layout"] == "state_dict"


def test_a_v1_model_passes(tmp_path):
    assert is_v1(SomaLM(spec_from_dict(tiny_v1_arch())).model)


# 5. A CUDA device on a CPU-only torch (this venv's), without monkeypatching.


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA devices")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
@pytest.mark.parametrize("command", ["score", "generate"])
def test_cuda_device_on_a_cpu_only_torch_is_one_line(capsys, tmp_path, data, command, device):
    if command == "score":
        weights = tmp_path / "w.safetensors"
        save_canonical(build_model(v1_spec(16, 2, 32, num_heads=4)), weights)
        args = ["score", "--weights", str(weights), "--data", str(data)]
    else:
        args = ["generate", "--ckpt", str(fresh_checkpoint(tmp_path / "m.ckpt", tiny_v1_arch())), "--prompt", "hi"]
    line = one_error_line(capsys, *args, "--device", device)
    assert line == f"soma-lightning: error: --device: {device} asked for, but no CUDA device is available (torch {torch.__version__}); use --device cpu"
