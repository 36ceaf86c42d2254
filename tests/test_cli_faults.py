"""Bad arguments and failing writes of `score`, `export` and `generate`: one line on stderr, exit code 2, and
nothing expensive done or overwritten first."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from soma_lightning import v1
from soma_lightning.cli import export as export_command, generate as generate_command, score as score_command
from soma_lightning.callbacks import safetensors_export
from soma_lightning.cli import main
from soma_lightning.lm import SomaLM
from soma_lightning.spec import build_model, spec_from_dict
from soma_lightning.v1 import canonical_shapes, dims_of, save_canonical, v1_spec
from conftest import fresh_checkpoint, one_error_line, tiny_v1_arch


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """Tiny canonical V1 weights (D 16, 2 layers, FF 32, 4 heads)."""
    path = tmp_path / "w.safetensors"
    save_canonical(build_model(v1_spec(16, 2, 32, num_heads=4)), path)
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def _never(*args, **kwargs):
    raise AssertionError("expensive work started before the arguments were checked")


@pytest.mark.parametrize("batch_size", ["0", "-2"])
def test_score_batch_size_must_be_positive(capsys, monkeypatch, weights, data, batch_size):
    monkeypatch.setattr(score_command, "model_from_canonical", _never)
    line = one_error_line(capsys, "score", "--weights", str(weights), "--data", str(data), "--num-heads", "4", "--batch-size", batch_size)
    assert f"--batch_size: expected a positive number of sequences per batch, got {batch_size}" in line


@pytest.mark.parametrize("command", ["score", "generate"])
@pytest.mark.parametrize("device, message", [("cuda", "no CUDA device is available"), ("cuda:0", "no CUDA device is available"), ("tpu", "expected cpu, cuda or cuda:N, got 'tpu'")], ids=["cuda", "cuda:0", "tpu"])
def test_device_that_is_not_there_is_refused_before_loading(capsys, monkeypatch, tmp_path, weights, data, command, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(score_command, "model_from_canonical", _never)
    monkeypatch.setattr(generate_command, "load_module", _never)
    if command == "score":
        args = ["score", "--weights", str(weights), "--data", str(data), "--num-heads", "4"]
    else:
        args = ["generate", "--ckpt", str(fresh_checkpoint(tmp_path / "m.ckpt")), "--prompt", "hi"]
    line = one_error_line(capsys, *args, "--device", device)
    assert line.startswith("soma-lightning: error: --device: ") and message in line


def test_score_embedding_out_in_a_missing_folder_is_refused_before_scoring(capsys, monkeypatch, tmp_path, weights, data):
    monkeypatch.setattr(score_command, "model_from_canonical", _never)
    line = one_error_line(capsys, "score", "--weights", str(weights), "--data", str(data), "--num-heads", "4", "--embedding-out", str(tmp_path / "missing" / "e.npy"))
    assert line.endswith(f"--embedding_out: the folder {tmp_path / 'missing'} does not exist; create it first")
    line = one_error_line(capsys, "score", "--weights", str(weights), "--data", str(data), "--num-heads", "4", "--embedding-out", str(tmp_path))
    assert f"--embedding_out: {tmp_path} is a directory" in line


def test_weights_not_of_the_registered_v1_size_warn_and_strict_v1_refuses(capsys, tmp_path, weights, data):
    main(["score", "--weights", str(weights), "--data", str(data), "--num-heads", "4"])
    out = capsys.readouterr()
    assert json.loads(out.out)["n_tokens"] == 1023
    warning, scoring = out.err.strip().splitlines()
    assert scoring.startswith("soma-lightning: scoring ") and "of 1024 bytes (the scorer's row length)" in scoring
    registered = "d_model 2048, 24 layers, 8 heads, hidden 8192, vocab 264"
    assert warning == (
        f"soma-lightning: warning: {weights} is d_model 16, 2 layers, 4 heads, hidden 32, vocab 264, not the registered V1 size "
        f"({registered}) that the network's scorer loads; scoring it anyway (--strict_v1 refuses)"
    )
    line = one_error_line(capsys, "score", "--weights", str(weights), "--data", str(data), "--num-heads", "4", "--strict-v1")
    assert line.startswith(f"soma-lightning: error: --strict_v1: {weights} is d_model 16, 2 layers") and registered in line
    ckpt = fresh_checkpoint(tmp_path / "m.ckpt")
    line = one_error_line(capsys, "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "m.safetensors"), "--strict-v1")
    assert line.startswith(f"soma-lightning: error: --strict_v1: {ckpt} is d_model 16, 2 layers") and registered in line
    assert not (tmp_path / "m.safetensors").exists()
    line = one_error_line(capsys, "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "m.safetensors"), "--strict-v1", "--layout", "state_dict")
    assert "--strict_v1: checks the canonical V1 layout, but --layout is state_dict" in line


def test_the_registered_v1_size_passes_the_shape_check():
    """The real 1.2B model, without its 4.8 GB: its canonical shapes and a meta-device model."""
    from soma_lightning.v1 import REGISTERED_SIZE, model_size, size_mismatch

    shapes = canonical_shapes(2048, 24, 8192)
    assert len(shapes) == 389 and sum(torch.Size(s).numel() for s in shapes.values()) == 1_209_684_232
    assert size_mismatch((*dims_of(shapes, "v1"), 8)) is None
    assert "4 heads" in size_mismatch((*dims_of(shapes, "v1"), 4))
    assert model_size(build_model(v1_spec(2048, 24, 8192), device="meta")) == REGISTERED_SIZE
    assert size_mismatch(model_size(build_model(v1_spec(2048, 23, 8192), device="meta"))).startswith("d_model 2048, 23 layers")


def test_export_out_that_is_a_directory_is_refused(capsys, monkeypatch, tmp_path):
    ckpt = fresh_checkpoint(tmp_path / "m.ckpt")
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(export_command, "load_module", _never)
    line = one_error_line(capsys, "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"))
    assert line.endswith(f"--out: {tmp_path / 'out'} is a directory; expected the path of the .safetensors file to write")


def test_export_refuses_to_overwrite_the_checkpoint_it_reads(capsys, tmp_path):
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "runs" / "q" / "version_0"
    last, best = fresh_checkpoint(run / "checkpoints" / "last.ckpt"), fresh_checkpoint(run / "checkpoints" / "best-step=1.ckpt")
    (tmp_path / "link.ckpt").symlink_to(last)
    module = SomaLM(spec_from_dict(tiny_v1_arch()))
    sharded = tmp_path / "sharded.ckpt"
    dcp.save({"model": module.state_dict()}, checkpoint_id=sharded)
    torch.save({"hyper_parameters": dict(module.hparams)}, sharded / "meta.pt")
    before = {p: p.read_bytes() for p in [last, best, *sharded.iterdir()]}
    for ckpt, which, out, protected in [
        (last, "best", last, last),
        (tmp_path / "link.ckpt", "best", last, last),
        (last, "best", tmp_path / "link.ckpt", last),
        (run, "last", last, last),
        (run, "best", best, best),
        (run, "best", last, last),  # another checkpoint of the run
        (sharded, "best", sharded / "meta.pt", sharded),
        (sharded, "best", sharded / "new.safetensors", sharded),
    ]:
        line = one_error_line(capsys, "export", "--ckpt", str(ckpt), "--which", which, "--out", str(out))
        assert line.startswith(f"soma-lightning: error: --out: {out} is ") and str(protected) in line and "would destroy it" in line, line
    assert {p: p.read_bytes() for p in before} == before and not (sharded / "new.safetensors").exists()
    main(["export", "--ckpt", str(run), "--out", str(run / "model.safetensors")])  # beside the checkpoints is fine
    assert json.loads(capsys.readouterr().out)["ckpt"] == str(best)


@pytest.mark.parametrize(
    "error, message",
    [
        (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
        (SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "/x/.tmpab12"'), "no space left on the device"),
    ],
    ids=["EROFS", "ENOSPC", "safetensors-ENOSPC"],
)
@pytest.mark.parametrize("layout", ["canonical", "state_dict"])
def test_export_write_error_is_one_line_and_keeps_the_previous_file(capsys, monkeypatch, tmp_path, error, message, layout):
    ckpt, out = fresh_checkpoint(tmp_path / "m.ckpt"), tmp_path / "m.safetensors"
    out.write_bytes(b"previous export")

    def fail(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(v1, "save_file", fail)
    monkeypatch.setattr(safetensors_export, "save_file", fail)
    line = one_error_line(capsys, "export", "--ckpt", str(ckpt), "--out", str(out), "--layout", layout)
    assert line == f"soma-lightning: error: --out: cannot write {out}: {message}; the previous file is unchanged"
    assert out.read_bytes() == b"previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt", "m.safetensors"]
    out.unlink()
    line = one_error_line(capsys, "export", "--ckpt", str(ckpt), "--out", str(out), "--layout", layout)
    assert line.endswith(f"cannot write {out}: {message}; nothing was written") and not out.exists()


def test_exports_honour_the_umask(capsys, tmp_path):
    """Like torch.save's checkpoints, not the 0600 of safetensors' private temp file."""
    ckpt = fresh_checkpoint(tmp_path / "m.ckpt")
    previous = os.umask(0o022)
    try:
        for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
            os.umask(umask)
            for layout in ("canonical", "state_dict"):
                out = tmp_path / f"{layout}-{umask:o}.safetensors"
                main(["export", "--ckpt", str(ckpt), "--out", str(out), "--layout", layout])
                assert oct(out.stat().st_mode & 0o777) == oct(mode), (layout, oct(umask))
                assert len(load_file(out)) == 37
    finally:
        os.umask(previous)
