"""Nothing a user is handed runs code when it is loaded: crafted `.ckpt` files, sharded folders (`meta.pt`,
torch.distributed.checkpoint's `.metadata`) and URLs are refused with one line naming the file, and the
payload's marker file never appears."""

import http.server
import os
import pickle
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import run_config, tiny_v1_arch
from soma_lightning.cli import main
from soma_lightning.lm import SomaLM
from soma_lightning.spec import ModelSpec


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_hparams() -> dict:
    return dict(SomaLM(arch=ModelSpec(**tiny_v1_arch())).hparams)


def refused(args: list[str], capsys, *names: str) -> str:
    """Runs the CLI, expects exit 2 with one `soma-lightning: error:` line that names each of `names`."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("soma-lightning: error:")]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert all(name in errors[0] for name in names), errors[0]
    return errors[0]


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "the payload ran"


def crafted_meta_folder(folder: Path, marker: Path) -> Path:
    """A sharded checkpoint folder whose meta.pt unpickles the payload."""
    folder.mkdir(parents=True)
    torch.save({"hyper_parameters": Payload(marker)}, folder / "meta.pt")
    return folder


def crafted_metadata_folder(folder: Path, marker: Path) -> Path:
    """A sharded checkpoint folder with a valid meta.pt and a `.metadata` that unpickles the payload."""
    folder.mkdir(parents=True)
    torch.save({"hyper_parameters": tiny_hparams()}, folder / "meta.pt")
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return folder


@pytest.mark.parametrize("command", [["export", "--out", "x.safetensors"], ["generate", "--prompt", "a"], ["graph", "--text", "a"]])
def test_crafted_meta_pt_is_refused(tmp_path, capsys, marker, command):
    folder = crafted_meta_folder(tmp_path / "ckpt", marker)
    refused([command[0], "--ckpt", str(folder), *command[1:]], capsys, "meta.pt", "refused")


def test_run_directory_whose_last_checkpoint_is_a_crafted_folder_is_refused(tmp_path, capsys, marker):
    run = tmp_path / "runs" / "q" / "version_0"
    crafted_meta_folder(run / "checkpoints" / "last.ckpt", marker)
    refused(["generate", "--ckpt", str(run), "--prompt", "a"], capsys, "meta.pt")


def test_crafted_dcp_metadata_is_refused_by_export(tmp_path, capsys, marker):
    folder = crafted_metadata_folder(tmp_path / "ckpt", marker)
    refused(["export", "--ckpt", str(folder), "--out", str(tmp_path / "x.safetensors")], capsys, ".metadata", "refused global posix.system")


def test_crafted_dcp_metadata_is_refused_when_resuming_under_fsdp2(tmp_path, capsys, marker):
    folder = crafted_metadata_folder(tmp_path / "ckpt", marker)
    config = run_config(tmp_path, "fsdp2", 2)
    refused(["fit", "--config", str(config), "--config", "specs/strategies/fsdp2.yaml", "--ckpt_path", str(folder)], capsys, ".metadata")


def test_crafted_ckpt_is_refused(tmp_path, capsys, marker):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": tiny_hparams(), "state_dict": Payload(marker)}, ckpt)
    refused(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.safetensors")], capsys, "evil.ckpt", "refused")
    refused(["fit", "--config", str(run_config(tmp_path, "q", 2)), "--ckpt_path", str(ckpt)], capsys, "evil.ckpt", "refused")


def test_url_checkpoint_is_refused_without_downloading(tmp_path, capsys, marker, monkeypatch):
    (tmp_path / "served").mkdir()
    torch.save(Payload(marker), tmp_path / "served" / "evil.ckpt")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            requests.append(args)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(tmp_path / "served")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/evil.ckpt"
        for subcommand in ("fit", "validate"):
            refused([subcommand, "--config", str(run_config(tmp_path, "q", 2)), "--ckpt_path", url], capsys, "--ckpt_path", "URL")
        refused(["export", "--ckpt", url, "--out", str(tmp_path / "x.safetensors")], capsys, "--ckpt", "URL")
    finally:
        server.shutdown()
    assert requests == []


def test_weights_only_false_is_refused(tmp_path, capsys):
    refused(["fit", "--config", str(run_config(tmp_path, "q", 2)), "--weights_only", "false"], capsys, "--weights_only")


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, os.urandom(4096), b"PK\x03\x04truncated"])
def test_files_that_are_not_checkpoints_are_one_line_errors(tmp_path, capsys, content):
    ckpt = tmp_path / "bad.ckpt"
    ckpt.write_bytes(content)
    refused(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.safetensors")], capsys, "bad.ckpt")
    refused(["validate", "--config", str(run_config(tmp_path, "q", 2)), "--ckpt_path", str(ckpt)], capsys, "bad.ckpt")


def test_missing_and_folder_checkpoints_are_one_line_errors(tmp_path, capsys):
    refused(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x.safetensors")], capsys, "nope.ckpt", "does not exist")
    (tmp_path / "empty").mkdir()
    refused(["export", "--ckpt", str(tmp_path / "empty"), "--out", str(tmp_path / "x.safetensors")], capsys, "empty")
    refused(["fit", "--config", str(run_config(tmp_path, "q", 2)), "--ckpt_path", str(tmp_path / "empty")], capsys, "--ckpt_path", "empty")


def test_truncated_trained_checkpoint_is_a_one_line_error(tmp_path, capsys):
    main(["fit", "--config", str(run_config(tmp_path, "q", 2))])
    ckpt = tmp_path / "runs" / "q" / "version_0" / "checkpoints" / "last.ckpt"
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    refused(["generate", "--ckpt", str(cut), "--prompt", "a"], capsys, "cut.ckpt", "truncated")


def test_restricted_reader_loads_a_genuine_distributed_checkpoint(tmp_path):
    """What FSDP2 and FSDP1 write - tensors, and optimizer hyper-parameters as pickled items - still loads."""
    import torch.distributed.checkpoint as dcp

    from soma_lightning.safe_unpickling import restricted_unpickling

    saved = {"model": {"w": torch.randn(3, 4), "b": torch.randn(2).bfloat16()}, "optim": {"lr": 0.1, "betas": (0.9, 0.95), "step": 3, "amsgrad": False}}
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(saved, checkpoint_id=tmp_path / "ckpt")
    loaded = {"model": {"w": torch.zeros(3, 4), "b": torch.zeros(2).bfloat16()}, "optim": {"lr": 0.0, "betas": (0.0, 0.0), "step": 0, "amsgrad": True}}
    with restricted_unpickling(), pytest.warns(UserWarning, match="single process"):
        dcp.load(loaded, checkpoint_id=tmp_path / "ckpt")
    assert torch.equal(loaded["model"]["w"], saved["model"]["w"]) and torch.equal(loaded["model"]["b"], saved["model"]["b"])
    assert loaded["optim"] == saved["optim"]
