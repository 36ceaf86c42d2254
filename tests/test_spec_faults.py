"""Bad specs, configs and data reach the user as one line and exit code 2, never as a traceback or a silent run."""

import os
import pathlib
import sys

import pytest
import yaml

from soma_lightning.cli import main
from soma_lightning.data_modules.byte_corpus import DataError
from soma_lightning.data_modules.modalities import BadInput
from soma_lightning.data_modules.multimodal import MultimodalCorpus
from soma_lightning.data_modules.prepare import Source, _load
from conftest import run_config


def _fails(capsys, *args: str) -> str:
    """The one error line of a command that must exit with code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("soma-lightning: error:")]
    assert exit.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _edit(path: pathlib.Path, edit) -> pathlib.Path:
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_vocab_size_must_hold_the_special_ids(tmp_path, capsys):
    config = run_config(tmp_path, "vocab", 1)
    line = _fails(capsys, "fit", "--config", str(config), "--model.arch.vocab_size", "200")
    assert "model.arch.vocab_size: must be at least 258 to hold the byte ids 0-255, PAD 256 and EOS 257" in line and "got 200" in line
    line = _fails(capsys, "inspect", "--config", str(_edit(config, lambda c: c["model"]["arch"].update(vocab_size=257))))
    assert line.startswith(f"soma-lightning: error: {config}: model.arch.vocab_size: must be at least 258") and "got 257" in line
    ranges = '{"bytes": [0, 256], "images": [258, 300]}'
    line = _fails(capsys, "fit", "--config", str(run_config(tmp_path, "ranges", 1)), "--model.arch.vocab_size", "300", "--model.arch.vocab_ranges", ranges)
    assert "model.arch.vocab_ranges: PAD 256 and EOS 257 must lie in a declared range" in line


USER_MIXER = """
import torch

built = []


class TinyMixer(torch.nn.Module):
    def __init__(self, d_model: int, width: int = 1) -> None:
        super().__init__()
        built.append(width)
        self.proj = torch.nn.Linear(d_model, d_model)

    def forward(self, x, ctx):
        return self.proj(x)
"""


def test_class_path_components_train_and_inspect(tmp_path, capsys, monkeypatch):
    (tmp_path / "spec_faults_user_mixer.py").write_text(USER_MIXER)
    monkeypatch.syspath_prepend(str(tmp_path))
    mixer = {"class_path": "spec_faults_user_mixer.TinyMixer", "init_args": {"width": 3}}
    config = _edit(run_config(tmp_path, "user", 2), lambda c: c["model"]["arch"]["blocks"]["layer"][0].update(mixer=mixer))
    main(["inspect", "--config", str(config)])
    assert "mixer:TinyMixer" in capsys.readouterr().out
    main(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    assert sys.modules["spec_faults_user_mixer"].built[-1] == 3
    assert (tmp_path / "runs" / "user" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_unknown_top_level_key_names_key_and_file(tmp_path, capsys):
    config = _edit(run_config(tmp_path, "typo", 1), lambda c: c.update(modle={"arch": {}}))
    line = _fails(capsys, "fit", "--config", str(config))
    assert line.startswith(f"soma-lightning: error: {config}: modle: unknown key; valid keys: ") and "model" in line
    config = _edit(config, lambda c: (c.pop("modle"), c["model"].update(optm={})))
    line = _fails(capsys, "fit", "--config", str(config))
    assert line.startswith(f"soma-lightning: error: {config}: model.optm: unknown key; valid keys under model: ")
    assert not (tmp_path / "runs").exists()


def test_negative_num_workers_fails_at_construction(tmp_path, capsys):
    line = _fails(capsys, "fit", "--config", str(run_config(tmp_path, "workers", 1)), "--data.init_args.num_workers=-1")
    assert line == "soma-lightning: error: data.num_workers: must be 0 (load in the main process) or a positive number of worker processes, got -1"
    with pytest.raises(DataError, match=r"^data.num_workers: must be 0 .* got -2$"):
        MultimodalCorpus(str(tmp_path), [Source("t", "text", str(tmp_path))], num_workers=-2)


def test_broken_link_among_the_data_files_is_named(tmp_path, capsys):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text " * 500)
    (corpus / "b.txt").symlink_to(tmp_path / "moved_away.txt")
    config = run_config(tmp_path, "link", 1)
    for source in (corpus, corpus / "*.txt", corpus / "b.txt"):
        line = _fails(capsys, "fit", "--config", str(config), "--data.init_args.source", str(source))
        assert line == f"soma-lightning: error: data.source: '{corpus / 'b.txt'}' is a broken symbolic link (to '{tmp_path / 'moved_away.txt'}')"


def test_unreadable_data_file_is_named(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text " * 500)
    locked = corpus / "b.txt"
    locked.write_text("more text " * 500)
    os.chmod(locked, 0)
    read_bytes = pathlib.Path.read_bytes

    def denied_to_root_too(self: pathlib.Path) -> bytes:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied_to_root_too)
    line = _fails(capsys, "fit", "--config", str(run_config(tmp_path, "locked", 1)), "--data.init_args.source", str(corpus))
    assert line == f"soma-lightning: error: data.source: cannot read '{locked}' (Permission denied)"
    with pytest.raises(BadInput, match=rf"^{locked}: unreadable file \(Permission denied\)$"):
        _load("text", str(locked), locked, None, None)


@pytest.mark.parametrize("spec", ["specs/hybrid_235b.yaml", "specs/gpt5_moe_design.yaml"])
def test_model_too_large_for_memory_fails_before_allocating(spec, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("a small corpus " * 100)
    args = ["fit", "--config", spec, "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--data.init_args.source", str(small)]
    line = _fails(capsys, *args)
    count = {"specs/hybrid_235b.yaml": "242,879,153,920", "specs/gpt5_moe_design.yaml": "1,574,526,179,328"}[spec]
    assert line.startswith(f"soma-lightning: error: model.arch: the model has {count} parameters, ")
    assert "bytes" in line and "of float32 weights, more than the" in line and "available on cpu" in line
