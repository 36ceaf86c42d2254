"""Prepared token shards (data_modules/token_shards.py) read memory-mapped: the reader equals the documents
joined with EOS, ByteCorpus trains and validates on them as on the same stream in memory, runs resume
exactly, and damaged or changed corpora are one-line errors."""

import json
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from torch.utils.data import DataLoader

from soma_lightning.cli import cli_main
from soma_lightning.data_modules import EOS, ByteCorpus, tokenize
from soma_lightning.data_modules.byte_corpus import ContractChunks, Corpus, DataError, RandomWindows
from soma_lightning.data_modules.shard_format import Manifest, ShardFile, manifest_hash
from soma_lightning.data_modules import token_shards
from soma_lightning.data_modules.token_shards import TokenShards
from conftest import run_config, train_losses

SHAKESPEARE = open("soma_lightning/corpora/tinyshakespeare.txt", "rb").read()[:30_000]
ANNOTATIONS = ("doc_ids", "structure")


def _texts(n: int, seed: int = 0, text: bytes = SHAKESPEARE) -> list[np.ndarray]:
    """n documents cut from `text` at random lengths (some empty), as byte ids."""
    rng = np.random.default_rng(seed)
    starts, lengths = rng.integers(0, len(text) - 400, n), rng.integers(0, 400, n)
    return [np.frombuffer(text[s : s + k], dtype=np.uint8).astype(np.int64) for s, k in zip(starts, lengths)]


def _prepare(root: Path, docs: list[np.ndarray], per_shard: list[int], dtype: str = "uint8", eos: int = EOS, tokenizer: str | dict = "bytes") -> Path:
    """Write `docs` as prepare does: shards of per_shard[i] documents (0 makes an empty shard), then the manifest."""
    shards, first = [], 0
    for i, n in enumerate(per_shard):
        part = docs[first : first + n]
        first += n
        shard = ShardFile(root, f"task0-{i}", np.dtype(dtype).itemsize)
        for d in part:
            shard.add(d.astype(dtype).tobytes())
        shards.append(shard.close())
    assert first == len(docs)
    Manifest(dtype, eos, tokenizer, shards).write(root)
    return root


def _joined(docs: list[np.ndarray], eos: int = EOS) -> np.ndarray:
    """The stream the shards stand for: every document followed by EOS."""
    return np.concatenate([np.append(d, eos) for d in docs]).astype(np.int64)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stop_at(step: int) -> str:
    return "--trainer.callbacks=" + json.dumps([{"class_path": "conftest.StopAtStep", "init_args": {"step": step}}])


@pytest.mark.parametrize("dtype, vocab", [("uint8", 256), ("uint16", 50_000), ("uint32", 100_000)])
def test_reader_equals_the_documents_joined_by_eos(tmp_path, monkeypatch, dtype, vocab):
    monkeypatch.setattr(token_shards, "OPEN_SHARDS", 2)  # reads also close and reopen shards
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, vocab, rng.integers(0, 30)) for _ in range(60)]
    eos = EOS if dtype == "uint8" else vocab
    per_shard = [7, 0, 1, 30, 22]  # an empty shard, a shard of one document
    reader = TokenShards(_prepare(tmp_path, docs, per_shard, dtype, eos, {"file": "tok.json", "sha256": "-", "vocab_size": vocab + 1}))
    stream = _joined(docs, eos)
    assert len(reader) == len(stream) == reader.manifest.tokens + reader.manifest.documents
    assert np.array_equal(reader.read(0, len(stream)), stream)
    eos_positions, shard_ends = np.flatnonzero(stream == eos), np.cumsum([s.tokens + s.documents for s in reader.manifest.shards])
    for edge in [*eos_positions, *shard_ends]:  # every read of up to 3 tokens around a document or shard boundary
        for start in range(max(edge - 3, 0), min(edge + 2, len(stream))):
            for length in range(min(4, len(stream) - start) + 1):
                assert np.array_equal(reader.read(start, length), stream[start : start + length]), (start, length)
    for _ in range(300):
        start = int(rng.integers(0, len(stream)))
        length = int(rng.integers(0, len(stream) - start + 1))
        assert np.array_equal(reader.read(start, length), stream[start : start + length])
    part = reader[100:500]
    assert len(part) == 400 and np.array_equal(np.asarray(part), stream[100:500])
    assert np.array_equal(part.read(10, 50), stream[110:160]) and np.array_equal(np.asarray(part[390:1000]), stream[490:500])
    with pytest.raises(IndexError):
        part.read(390, 11)
    copy = pickle.dumps(part)  # what a DataLoader worker receives: paths, not tokens or open maps
    assert len(copy) < 5000 and np.array_equal(np.asarray(pickle.loads(copy)), stream[100:500])


def test_byte_corpus_from_shards_trains_and_validates_as_on_the_stream_in_memory(tmp_path):
    docs = _texts(120)
    root = _prepare(tmp_path / "shards", docs, [50, 40, 30])
    stream = _joined(docs).astype(np.uint16)
    dm = ByteCorpus(source=str(root), val_fraction=0.2, seq_len=32, batch_size=4, val_seq_len=48, val_batch_size=3, doc_ids=True, structure=True)
    dm.setup("fit")
    cut = int(len(stream) * 0.8)
    assert isinstance(dm.train_stream, TokenShards) and len(dm.train_stream) == cut and len(dm.val_stream) == len(stream) - cut
    windows = RandomWindows([stream[:cut]], 32, 4, seed=0, annotations=ANNOTATIONS)
    for b, batch in zip(range(6), dm.train_dataloader()):
        assert _equal(batch, windows.batch(b))
    got = list(dm.val_dataloader())
    assert all(_equal(g, w) for g, w in zip(got, DataLoader(ContractChunks(stream[cut:], 48, ANNOTATIONS), batch_size=3), strict=True))
    contract = tokenize(torch.from_numpy(stream[cut:].astype(np.int64)), 48)  # the contract's rows, last one padded
    for key in ("tokens", "targets", "positions"):
        assert torch.equal(torch.cat([g[key] for g in got]), contract[key])

    other = _texts(30, seed=2)
    dm = ByteCorpus(source=str(root), val_source=str(_prepare(tmp_path / "val", other, [30])), test_source=str(tmp_path / "val"), val_seq_len=64)
    dm.setup("fit")
    rows = ContractChunks(_joined(other).astype(np.uint16), 64)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert all(_equal(g, w) for g, w in zip(loader, DataLoader(rows, batch_size=16), strict=True))


def test_a_weighted_mixture_of_prepared_corpora(tmp_path):
    letters, digits = _texts(40, text=b"abcdefgh " * 500), _texts(40, seed=1, text=b"0123456789 " * 500)
    a, b = _prepare(tmp_path / "a", letters, [20, 20]), _prepare(tmp_path / "b", digits, [40])
    parser = ArgumentParser()
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    spec = {"class_path": "soma_lightning.data_modules.ByteCorpus", "init_args": {"mixture": [{"path": str(a), "weight": 3}, {"path": str(b)}], "seq_len": 16, "batch_size": 400}}
    dm = parser.instantiate(parser.parse_object({"data": spec})).data
    assert dm.corpora == [Corpus(str(a), 3.0), Corpus(str(b), 1.0)]
    dm.setup("fit")
    streams = [_joined(d).astype(np.uint16) for d in (letters, digits)]
    cuts = [int(len(s) * 0.9) for s in streams]
    batch = next(iter(dm.train_dataloader()))
    assert _equal(batch, RandomWindows([s[:c] for s, c in zip(streams, cuts)], 16, 400, seed=0, weights=[3, 1]).batch(0))
    from_letters = ((batch["tokens"] >= ord("a")) & (batch["tokens"] < 256)).any(dim=1)
    assert 0.68 < from_letters.float().mean() < 0.82
    got = list(dm.val_dataloader())
    tails = [tokenize(torch.from_numpy(s[c:].astype(np.int64)), 1024) for s, c in zip(streams, cuts)]  # each corpus's held-out tail
    for key in ("tokens", "targets", "positions"):
        assert torch.equal(torch.cat([g[key] for g in got]), torch.cat([t[key] for t in tails]))
    with pytest.raises(DataError, match=r"data.mixture\[1\].weight: must be positive, got 0"):
        ByteCorpus(mixture=[Corpus(str(a)), Corpus(str(b), 0)])
    with pytest.raises(DataError, match="data.mixture: a list of one or more corpora, given instead of data.source"):
        ByteCorpus(source=str(a), mixture=[Corpus(str(b))])


def test_global_batches_and_worker_processes_draw_the_same_windows(tmp_path):
    root = _prepare(tmp_path, _texts(80), [30, 30, 20])
    shards = TokenShards(root)
    whole = RandomWindows([shards], 24, 4, seed=5).batch(3)
    halves = [RandomWindows([shards], 24, 2, seed=5, rank=r, world_size=2).batch(3) for r in range(2)]
    assert torch.equal(torch.cat([h["tokens"] for h in halves]), whole["tokens"])
    assert torch.equal(torch.cat([h["positions"] for h in halves]), whole["positions"])
    loaded = {}
    for workers in (0, 2):
        dm = ByteCorpus(source=str(root), seq_len=24, batch_size=4, val_seq_len=32, num_workers=workers, doc_ids=True)
        dm.setup("fit")
        loaded[workers] = [b for _, b in zip(range(7), dm.train_dataloader())], list(dm.val_dataloader())
    for one, two in zip(loaded[0], loaded[2]):
        assert len(one) == len(two) and all(_equal(a, b) for a, b in zip(one, two))


def test_damaged_and_foreign_shards_are_one_line_errors(tmp_path):
    root = _prepare(tmp_path / "c", _texts(20), [10, 10])
    bin_path = root / "shards" / "task0-1.bin"
    size = bin_path.stat().st_size
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-1])
    with pytest.raises(DataError) as e:
        TokenShards(root)
    assert str(e.value) == f"data.source: {bin_path} should hold {size} uint8 tokens ({size} bytes), found {size - 1} bytes; prepare again"
    bin_path.write_bytes(data[:-1] + bytes([(data[-1] + 1) % 256]))  # the right size, other content
    TokenShards(root)
    with pytest.raises(DataError) as e:
        ByteCorpus(source=str(root), seq_len=8, verify_checksums=True).setup("fit")
    assert str(bin_path) in str(e.value) and "the manifest records" in str(e.value) and "\n" not in str(e.value)
    (root / "shards" / "task0-0.docs.npy").unlink()
    with pytest.raises(DataError, match="task0-0.docs.npy is missing"):
        TokenShards(root)
    (root / "manifest.json").unlink()  # an unfinished prepare: shards, no manifest
    with pytest.raises(DataError, match=f"data.source: {root} holds shards but no manifest.json"):
        ByteCorpus(source=str(root), seq_len=8).setup("fit")
    tokens = _prepare(tmp_path / "t", _texts(5), [5], "uint16", 50_000, {"file": "tok.json", "sha256": "-", "vocab_size": 50_000})
    with pytest.raises(DataError, match=rf"holds the ids of {tokens / 'tok.json'} \(sha256 -, EOS 50000\), not of the run's tokenizer bytes \(EOS 257\)"):
        ByteCorpus(source=str(tokens), seq_len=8).setup("fit")  # a bytes corpus; tests/test_subword.py trains on tokenizer shards


def test_checkpoints_record_the_manifest_and_refuse_a_changed_corpus(tmp_path):
    root = _prepare(tmp_path / "c", _texts(20), [10, 10])
    dm = ByteCorpus(source=str(root), seq_len=8)
    dm.setup("fit")
    state = dm.state_dict()
    assert state == {"manifest_sha256": {str(root.resolve()): manifest_hash(root)}} == {"manifest_sha256": dm.fingerprints()}
    _prepare(root, _texts(20, seed=3), [20])
    changed = ByteCorpus(source=str(root), seq_len=8)
    changed.setup("fit")
    with pytest.raises(DataError, match=f"data.source: {root.resolve()} changed since the checkpoint"):
        changed.load_state_dict(state)
    (tmp_path / "plain.txt").write_bytes(SHAKESPEARE)
    plain = ByteCorpus(source=str(tmp_path / "plain.txt"), seq_len=8)
    plain.setup("fit")
    assert plain.fingerprints() == {} and plain.state_dict() == {}
    plain.load_state_dict(state)


def test_resumed_twice_from_shards_equals_an_uninterrupted_run(tmp_path):
    """Stopped at steps 2 and 4 and resumed each time: the losses of an uninterrupted run, bitwise; run_info.json
    names the corpus's manifest; resuming on a corpus changed since the checkpoint is refused, evaluating on it
    is not."""
    root = _prepare(tmp_path / "shards", _texts(200), [70, 70, 60])
    source = ["--data.init_args.source", str(root)]
    cli_main(["fit", "--config", str(run_config(tmp_path, "straight", 6, val_check_interval=2)), *source])
    split = str(run_config(tmp_path, "split", 6, val_check_interval=2))  # last.ckpt is written at every validation
    cli_main(["fit", "--config", split, *source, _stop_at(2)])
    cli_main(["fit", "--config", split, *source, _stop_at(4), "--ckpt_path", "last"])
    cli_main(["fit", "--config", split, *source, "--ckpt_path", "last"])
    straight = train_losses(tmp_path / "runs/straight/version_0/metrics.csv")
    resumed = train_losses(tmp_path / "runs/split/version_0/metrics.csv")
    assert resumed == straight and sorted(resumed) == list(range(6))
    info = json.loads((tmp_path / "runs/split/version_0/run_info.json").read_text())
    assert info["corpus_manifest_sha256"] == {str(root.resolve()): manifest_hash(root)}
    _prepare(root, _texts(200, seed=4), [200])
    with pytest.raises(DataError, match="changed since the checkpoint"):
        cli_main(["fit", "--config", split, *source, "--ckpt_path", "last", "--trainer.max_steps", "8"])
    cli_main(["validate", "--config", split, *source, "--ckpt_path", "last"])


@pytest.mark.slow
def test_resume_on_two_processes_keeps_the_global_batches_from_shards(tmp_path):
    """One process with batch 4 stops at step 2; the run resumes on 2 gloo processes with batch 2 each: the
    global batches are those of an uninterrupted one-process run, and so are the losses (SIGReg off)."""
    from test_scale_out import _batches, _callbacks, _fit

    root = _prepare(tmp_path / "shards", _texts(200), [70, 70, 60])
    record = tmp_path / "batches"
    record.mkdir()
    common = ["--data.init_args.source", str(root), "--model.sigreg.coefficient", "0", "--seed_everything", "1"]
    _fit("--config", str(run_config(tmp_path, "one", 4, dropout=0.0, val_check_interval=2)), *common, _callbacks(("test_scale_out.RecordBatches", {"path": str(record / "one")})))
    split = str(run_config(tmp_path, "split", 4, dropout=0.0, val_check_interval=2))
    _fit("--config", split, *common, _callbacks(("conftest.StopAtStep", {"step": 2})))
    _fit(
        "--config", split, *common, "--ckpt_path", "last", "--trainer.devices", "2", "--config", "specs/strategies/ddp.yaml",
        "--data.init_args.batch_size", "2", _callbacks(("test_scale_out.RecordBatches", {"path": str(record / "two")})),
    )
    one, two = _batches(record / "one"), _batches(record / "two")
    assert sorted(two) == [2, 3] and all(two[s] == one[s] for s in two)
    straight = train_losses(tmp_path / "runs/one/version_0/metrics.csv", "train/ce")
    resumed = train_losses(tmp_path / "runs/split/version_0/metrics.csv", "train/ce")
    assert [resumed[s] for s in (2, 3)] == pytest.approx([straight[s] for s in (2, 3)], rel=1e-5)
