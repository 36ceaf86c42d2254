"""Training on the ids of a tokenizers JSON file: through the CLI from a prepared directory and from plain text
(the same batches either way), document ids at the tokenizer's EOS, a checkpoint that records its tokenizer
and loads with the file moved, and the one-line errors of tokenizers that do not agree."""

import csv
import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from soma_lightning import load
from soma_lightning.checkpoints import load_module
from soma_lightning.cli import cli_main
from soma_lightning.data_modules import ByteCorpus
from soma_lightning.data_modules.byte_corpus import document_ids
from soma_lightning.data_modules.prepare_text import TextSources, prepare_text
from soma_lightning.errors import DataError, SpecError, UserError
from soma_lightning.lm import TOKENIZER_SHA256
from soma_lightning.spec import spec_from_dict
from soma_lightning.vocabulary import Vocabulary, vocabulary
from conftest import one_error_line, tiny_v1_arch
from test_prepare_text import bpe_tokenizer

TEXT = open("soma_lightning/corpora/tinyshakespeare.txt").read()[:24_000]
BATCHES: list[torch.Tensor] = []  # the training tokens of the last fit


class RecordTokens(L.Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        BATCHES.clear()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        BATCHES.append(batch["tokens"].clone())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Tiny Shakespeare as 8 documents, a file each."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (folder / f"{i}.txt").write_text(TEXT[i * 3000 : (i + 1) * 3000])
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return bpe_tokenizer(tmp_path_factory.mktemp("tokenizer") / "bpe.json")


@pytest.fixture(scope="module")
def vocab(tokenizer) -> Vocabulary:
    return vocabulary(str(tokenizer))


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "out"
    prepare_text(TextSources(str(corpus)), out, tokenizer=str(tokenizer))
    return out


def _config(tmp_path: Path, name: str) -> Path:
    """specs/hybrid_tiny.yaml (doc_ids on) for two steps, logging to tmp_path/runs/NAME, recording its batches."""
    cfg = yaml.safe_load(open("specs/hybrid_tiny.yaml"))
    cfg["trainer"] |= {
        "max_steps": 2, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1, "enable_progress_bar": False,
        "enable_model_summary": False, "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": name}},
        "callbacks": [{"class_path": "test_subword.RecordTokens"}],
    }
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def _fit(tmp_path: Path, name: str, source: Path, tokenizer: Path, vocab_size: int) -> tuple[Path, list[torch.Tensor]]:
    """Two steps on `source` through the CLI, the model's tokenizer set on the command line only (the data
    takes it from the model): the run directory and the training batches' tokens."""
    cli_main([
        "fit", "--config", str(_config(tmp_path, name)), "--model.arch.tokenizer", str(tokenizer), "--model.arch.vocab_size", str(vocab_size),
        "--data.init_args.source", str(source),
    ])
    return tmp_path / "runs" / name / "version_0", list(BATCHES)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> tuple[Path, list[torch.Tensor], Path]:
    """A run trained from the plain text files (encoded in memory) with its own copy of the tokenizer, which
    the tests may move: (run directory, its batches, tokenizer file)."""
    tmp_path = tmp_path_factory.mktemp("run")
    tokenizer = bpe_tokenizer(tmp_path / "bpe.json")
    return *_fit(tmp_path, "plain", corpus, tokenizer, vocabulary(str(tokenizer)).pad + 1), tokenizer


def _check_run(version: Path, batches: list[torch.Tensor], vocab: Vocabulary) -> None:
    """Finite losses, CE logged in bits per token, batches of real subword ids, and what the run records."""
    rows = list(csv.DictReader(open(version / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any(r.get("val/bits_per_token") for r in rows) and "val/bits_per_byte" not in rows[0]
    tokens = torch.cat(batches)
    assert len(batches) == 2 and (tokens >= 256).any() and tokens.max() < vocab.size
    config = yaml.safe_load((version / "config.yaml").read_text())
    assert config["data"]["init_args"]["tokenizer"] == config["model"]["arch"]["tokenizer"] == vocab.tokenizer  # set from the model
    info = json.loads((version / "run_info.json").read_text())
    assert info["tokenizer"] == {"file": str(Path(vocab.tokenizer).resolve()), "sha256": vocab.sha256}
    assert (version / "tokenizer.json").read_bytes() == Path(vocab.tokenizer).read_bytes()
    assert torch.load(version / "checkpoints" / "last.ckpt", weights_only=True)[TOKENIZER_SHA256] == vocab.sha256


def test_trains_from_plain_text_encoded_in_memory(run):
    version, batches, tokenizer = run
    _check_run(version, batches, vocabulary(str(tokenizer)))


def test_trains_from_a_prepared_directory(prepared, tokenizer, vocab, tmp_path):
    _check_run(*_fit(tmp_path, "prepared", prepared, tokenizer, vocab.pad + 1), vocab)


def test_prepared_and_plain_sources_give_the_same_batches(corpus, prepared, tokenizer, vocab):
    def batches(source: Path) -> tuple[list[dict], list[dict]]:
        dm = ByteCorpus(source=str(source), tokenizer=str(tokenizer), seq_len=48, batch_size=4, val_seq_len=40, val_batch_size=3, doc_ids=True)
        dm.setup("fit")
        return [b for _, b in zip(range(5), dm.train_dataloader())], list(dm.val_dataloader())

    plain, from_shards = batches(corpus), batches(prepared)
    for mine, theirs in zip(plain, from_shards, strict=True):
        assert len(mine) == len(theirs) and all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(mine, theirs))
    for batch in plain[0] + plain[1]:
        assert torch.equal(batch["doc_ids"], document_ids(batch["tokens"], vocab.eos))
    last = plain[1][-1]
    assert (last["tokens"] == vocab.pad).any() and (last["targets"] == vocab.pad).any()  # the last row is padded with the tokenizer's PAD
    assert vocab.decode(plain[0][0]["tokens"][0].tolist()) in TEXT


def test_document_ids_at_a_subword_eos_are_causal(vocab):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab.size, (3, 40), generator=g)
    tokens[:, 5::9] = vocab.eos
    tokens[:, 3] = 257  # the byte contract's EOS is an ordinary id here
    ids = document_ids(tokens, vocab.eos)
    assert ids[0].tolist() == [0] * 6 + [1] * 9 + [2] * 9 + [3] * 9 + [4] * 7
    for t in range(tokens.shape[1] - 1):
        changed = tokens.clone()
        changed[:, t + 1 :] = torch.randint(0, 3, changed[:, t + 1 :].shape, generator=g)  # many EOS (id 0) after t
        assert torch.equal(document_ids(changed, vocab.eos)[:, : t + 1], ids[:, : t + 1]), t


def test_tokenizers_that_do_not_agree_are_one_line_errors(capsys, corpus, prepared, tokenizer, vocab, tmp_path):
    other = bpe_tokenizer(tmp_path / "other.json", vocab_size=300)
    with pytest.raises(DataError) as e:
        ByteCorpus(source=str(prepared), seq_len=8).setup("fit")  # bytes
    assert str(e.value) == (
        f"data.source: {prepared} holds the ids of {prepared / 'tokenizer.json'} (sha256 {vocab.sha256}, EOS {vocab.eos}), not of the run's "
        f"tokenizer bytes (EOS 257); train with --model.arch.tokenizer {prepared / 'tokenizer.json'}, or prepare it again with --tokenizer bytes"
    )
    fit = ["fit", "--config", str(_config(tmp_path, "refused")), "--data.init_args.source", str(prepared), "--model.arch.vocab_size", "400"]
    line = one_error_line(capsys, *fit, "--model.arch.tokenizer", str(other))
    assert f"data.source: {prepared} holds the ids of {prepared / 'tokenizer.json'} (sha256 {vocab.sha256}" in line
    assert f"not of the run's tokenizer {other} (sha256 " in line and "--tokenizer" in line
    line = one_error_line(capsys, *fit, "--model.arch.tokenizer", str(tokenizer), "--data.init_args.tokenizer", str(other))
    assert f"data.init_args.tokenizer: {other} (eos_token <|endoftext|>) differs from model.arch.tokenizer {tokenizer}" in line

    arch = tiny_v1_arch() | {"tokenizer": str(tokenizer), "vocab_size": vocab.pad}
    with pytest.raises(SpecError) as e:
        spec_from_dict(arch)
    assert str(e.value) == (
        f"model.arch.vocab_size: must be at least {vocab.pad + 1} to hold the ids 0-{vocab.size - 1} of {tokenizer}, PAD {vocab.pad} and EOS {vocab.eos} "
        f"(every data module's batches hold them), got {vocab.pad}"
    )
    with pytest.raises(SpecError, match=r"^model.arch.eos_token: '</s>' is not a token of .*; name its end-of-document token with model.arch.eos_token$"):
        spec_from_dict(arch | {"vocab_size": 400, "eos_token": "</s>"})
    with pytest.raises(DataError, match=r"^data.structure: the structural spans are read from bytes, not from the ids of data.tokenizer .*; set structure false$"):
        ByteCorpus(source=str(corpus), tokenizer=str(tokenizer), structure=True)


def test_a_checkpoint_loads_with_its_tokenizer_moved_and_refuses_another(run, tmp_path, capsys):
    version, _, tokenizer = run
    ckpt = version / "checkpoints" / "last.ckpt"
    sha256 = vocabulary(str(tokenizer)).sha256
    moved = shutil.copy(tokenizer, str(tmp_path / "moved.json"))
    reference = load_module(ckpt)
    tokenizer.unlink()  # gone from where the spec says it is
    try:
        with pytest.raises(UserError) as e:
            load_module(ckpt)
        assert str(e.value) == f"--tokenizer: {ckpt} was trained with the tokenizer file of sha256 {sha256}, not {tokenizer} (missing); pass that file as --tokenizer"
        other = str(bpe_tokenizer(tmp_path / "other.json", vocab_size=300))
        with pytest.raises(UserError, match=rf"^tokenizer: .* of sha256 {sha256}, not {other} \(sha256 [0-9a-f]{{64}}\); pass that file as tokenizer$"):
            load(version, tokenizer=other)
        for module in (load_module(ckpt, tokenizer=moved), load(version, tokenizer=moved)):
            assert module.vocabulary.tokenizer == moved and module.vocabulary.sha256 == sha256 and module.arch.tokenizer == moved
            assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), reference.state_dict().values()))
        # The CLI resumes and evaluates with the file elsewhere: the path is not compared, the SHA-256 is.
        cli_main(["validate", "--config", str(version / "config.yaml"), "--model.arch.tokenizer", moved, "--data.init_args.tokenizer", moved, "--ckpt_path", str(ckpt)])
        assert json.loads((version / "validate-last.json").read_text())["val/bits_per_token"] > 0
        capsys.readouterr()
        line = one_error_line(capsys, "validate", "--config", str(version / "config.yaml"), "--model.arch.tokenizer", other, "--data.init_args.tokenizer", other, "--ckpt_path", str(ckpt))
        assert line.endswith(f"--model.arch.tokenizer: the checkpoint was trained with the tokenizer file of sha256 {sha256}, not {other} (sha256 {vocabulary(other).sha256}); pass that file as --model.arch.tokenizer")
    finally:
        shutil.copy(moved, tokenizer)
