"""ByteCorpus: train on random byte windows, validate and test on the SOMA V1 data contract."""

import glob
import itertools
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, IterableDataset

from soma_lightning.data_modules.contract import EOS, PAD, tokenize
from soma_lightning.data_modules.structure import batch_structure
from soma_lightning.data_modules.token_shards import TokenShards, open_prepared
from soma_lightning.errors import DataError
from soma_lightning.parallel.mesh import batch_replica
from soma_lightning.vocabulary import BYTE_VOCABULARY, BYTES, DEFAULT_EOS_TOKEN, Vocabulary, vocabulary

EMBEDDED = "tinyshakespeare"
Stream = Union[np.ndarray, TokenShards]  # a 1-D token array (in memory or memory-mapped), or a prepared corpus's reader


def require_positive(**values: int) -> None:
    """A DataError naming the first `data.KEY` that is not positive."""
    for key, value in values.items():
        if value <= 0:
            raise DataError(f"data.{key}: must be positive, got {value}")


def require_num_workers(num_workers: int) -> None:
    """A DataError naming data.num_workers unless it is a count of DataLoader worker processes."""
    if num_workers < 0:
        raise DataError(f"data.num_workers: must be 0 (load in the main process) or a positive number of worker processes, got {num_workers}")


def _refuse_broken_link(path: Path, key: str) -> None:
    if path.is_symlink() and not path.exists():
        raise DataError(f"{key}: {str(path)!r} is a broken symbolic link (to {os.readlink(path)!r})")


def source_files(source: str, key: str) -> list[Path]:
    """The data files of a file, a directory (every file below it but hidden ones) or a glob, in path order;
    a broken symbolic link among them is a DataError naming it."""
    path = Path(source)
    _refuse_broken_link(path, key)
    if path.is_file():
        return [path]
    if path.is_dir():
        entries = sorted(f for f in path.rglob("*") if not f.name.startswith("."))
    else:
        entries = sorted(Path(f) for f in glob.glob(source, recursive=True))
    for f in entries:
        _refuse_broken_link(f, key)
    files = [f for f in entries if f.is_file()]
    if not files:
        raise DataError(f"{key}: directory {source!r} holds no files" if path.is_dir() else f"{key}: {source!r} is no file or directory and matches no file as a glob")
    return files


def read_file(file: Path, key: str) -> bytes:
    """The bytes of a data file; a DataError naming it when it cannot be read."""
    try:
        return file.read_bytes()
    except OSError as e:
        raise DataError(f"{key}: cannot read {str(file)!r} ({e.strerror or e})") from None


def hf_column(source: str, key: str, hf_format: str, column: str, sample_by: str = "document") -> list:
    """One column of a local HF `datasets` source (text, json or parquet files), a value per row; with the
    text format a row is a whole file, a paragraph or a line (`sample_by`)."""
    import datasets

    files = source_files(source, key)
    kwargs = {"sample_by": sample_by} if hf_format == "text" else {}
    try:
        ds = datasets.load_dataset(hf_format, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as e:
        raise DataError(f"{key}: cannot load {source!r} as {hf_format} ({type(e).__name__}: {e})") from None
    if column not in ds.column_names:
        raise DataError(f"{key}: {source!r} has no column {column!r}; columns: {', '.join(ds.column_names)}")
    return ds[column]


def read_stream(source: str, key: str, hf_format: str | None = None, text_column: str = "text", vocab: Vocabulary = BYTE_VOCABULARY) -> np.ndarray:
    """All documents of `source` as one token stream. A document is a file's bytes, or with `hf_format` one
    row's `text_column` (utf-8) of a local HF `datasets` source. Bytes: uint16, documents joined by EOS; a
    tokenizer's ids: encoded here, as `prepare --tokenizer` stores them (encode_documents)."""
    if hf_format is None:
        docs = [read_file(f, key) for f in source_files(source, key)]
    else:
        docs = [str(row).encode() for row in hf_column(source, key, hf_format, text_column)]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{key}: {source!r} holds no data (every document is empty)")
    if not vocab.is_bytes:
        return encode_documents(docs, vocab, key)
    parts = []
    for i, doc in enumerate(docs):
        if i:
            parts.append(np.array([EOS], dtype=np.uint16))
        parts.append(np.frombuffer(doc, dtype=np.uint8).astype(np.uint16))
    return np.concatenate(parts)


def encode_documents(docs: list[bytes], vocab: Vocabulary, key: str) -> np.ndarray:
    """The tokenizer's ids of `docs` (UTF-8) as one stream, each document followed by EOS, uint16 or uint32 by
    vocabulary size: the stream `prepare --tokenizer` makes of the same documents (it too leaves out those
    without ids)."""
    dtype = np.uint16 if vocab.size <= 1 << 16 else np.uint32
    encoded = [np.asarray([*ids, vocab.eos], dtype=dtype) for ids in vocab.encode_batch(docs) if ids]
    if not encoded:
        raise DataError(f"{key}: no document has tokens in {vocab.tokenizer}")
    return np.concatenate(encoded)


def document_ids(tokens: torch.Tensor, eos: int = EOS) -> torch.Tensor:
    """[B, T] index of the document each position belongs to within its row: it grows after every `eos`."""
    after_eos = (tokens == eos).long().cumsum(dim=-1)
    return torch.cat([torch.zeros_like(after_eos[..., :1]), after_eos[..., :-1]], dim=-1)


def annotate(batch: dict[str, torch.Tensor], annotations: tuple[str, ...], eos: int = EOS) -> dict[str, torch.Tensor]:
    """Add per-token annotations computed from the batch's tokens, whose documents end at `eos`."""
    compute = {"doc_ids": lambda tokens: document_ids(tokens, eos), "structure": batch_structure}
    return batch | {name: compute[name](batch["tokens"]) for name in annotations}


def data_position(trainer: L.Trainer | None) -> tuple[int, int, int]:
    """(first batch, rank, world size) of this process's training windows. The first batch is the data
    position: after resuming at step N, the batch an uninterrupted run would draw next. Tensor- and
    context-parallel ranks of one group read the same windows."""
    if trainer is None:
        return 0, 0, 1
    return trainer.global_step * trainer.accumulate_grad_batches, *batch_replica(trainer.strategy, trainer.global_rank, trainer.world_size)


def pin_memory(trainer: L.Trainer | None) -> bool:
    """Whether batches should be collated into pinned memory: on a GPU, a copy from pageable memory makes the
    host wait for everything queued on the device, once per batch; from pinned memory it is asynchronous."""
    return trainer is not None and trainer.strategy.root_device.type == "cuda"


class RandomWindows(IterableDataset):
    """An endless stream of training batches. Global batch b is a deterministic function of (seed, b):
    world_size * batch_size windows drawn with numpy's generator seeded with [seed, b] (with several streams,
    first each window's stream, by `weights`, then its offset); this rank takes its slice. Each row is laid
    out as the contract lays out a full chunk: targets shifted left with PAD appended, positions the offsets
    in the window's stream. Iteration starts at `start_batch` (the data position). Only the windows are read,
    so memory-mapped streams stay on disk. `pad` and `eos` are the streams' (the V1 contract's for bytes)."""

    def __init__(
        self, streams: list[Stream], seq_len: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world_size: int = 1,
        annotations: tuple[str, ...] = (), weights: list[float] | None = None, pad: int = PAD, eos: int = EOS,
    ) -> None:
        self.streams, self.lengths = streams, np.array([len(s) for s in streams])
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.annotations, self.pad, self.eos = annotations, pad, eos

    def batch(self, b: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, b])
        n = self.world_size * self.batch_size
        if len(self.streams) == 1:
            which = np.zeros(n, dtype=np.int64)
            starts = rng.integers(0, self.lengths[0] - self.seq_len + 1, size=n)
        else:
            which = rng.choice(len(self.streams), size=n, p=self.weights)
            starts = rng.integers(0, self.lengths[which] - self.seq_len + 1)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        tokens = torch.from_numpy(np.stack([self.streams[s][o : o + self.seq_len] for s, o in zip(which[mine], starts[mine])]).astype(np.int64))
        positions = torch.from_numpy(starts[mine]).unsqueeze(1) + torch.arange(self.seq_len)
        targets = torch.cat([tokens[:, 1:], torch.full((len(tokens), 1), self.pad)], dim=1)
        return annotate({"tokens": tokens, "targets": targets, "positions": positions}, self.annotations, self.eos)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for b in itertools.count(self.start_batch + worker, workers):
            yield self.batch(b)


class ContractChunks(torch.utils.data.Dataset):
    """A token stream cut into the contract's rows (tokenize, with the stream's `pad` and `eos`); item i reads
    tokens [i * seq_len, (i + 1) * seq_len)."""

    def __init__(self, stream: Stream, seq_len: int, annotations: tuple[str, ...] = (), pad: int = PAD, eos: int = EOS) -> None:
        self.stream, self.seq_len, self.annotations, self.pad, self.eos = stream, seq_len, annotations, pad, eos

    def __len__(self) -> int:
        return -(-len(self.stream) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.seq_len
        row = tokenize(torch.from_numpy(np.asarray(self.stream[start : start + self.seq_len], dtype=np.int64)), self.seq_len, self.pad, self.eos)
        row["positions"] += start
        return {k: v[0] for k, v in annotate(row, self.annotations, self.eos).items()}


@dataclass
class Corpus:
    """One corpus of a mixture (a prepared directory, or any source) and its share of the training windows."""

    path: str
    weight: float = 1.0


class ByteCorpus(L.LightningDataModule):
    """Bytes, or a tokenizer's ids, from a file, a directory, a glob, a local HF dataset (`hf_format`
    text/json/parquet with a `text_column`) or a corpus prepared by `soma-lightning prepare` (memory-mapped,
    not read into memory), or a weighted mixture of corpora; by default the tiny-Shakespeare text shipped in
    the package.

    Train/val: separate sources (`val_source`), or the last `val_fraction` of each corpus's token stream (the
    split nanoGPT uses). Training draws `batch_size` random windows of `seq_len`, each corpus's share by
    weight; validation and test cut their streams into the V1 contract's non-overlapping chunks.

    Args:
        source: a file, a directory, a glob, a local HF dataset or a prepared directory; null: tiny Shakespeare.
        val_source: the validation text (a prepared directory too); null: the last val_fraction of source.
        test_source: the test text, for `soma-lightning test`.
        val_fraction: the share of source's stream held out for validation when val_source is null.
        hf_format: read source as an HF dataset of this format (text, json, parquet).
        text_column: the column holding the text in an HF dataset.
        mixture: instead of source, a list of corpora {path, weight} (weights are normalised).
        seq_len: training window length, in tokens.
        batch_size: training windows per batch (per device).
        val_seq_len: validation and test chunk length, in tokens.
        val_batch_size: validation and test chunks per batch.
        seed: seeds the training windows' positions (batch b draws from (seed, b)).
        num_workers: DataLoader worker processes.
        doc_ids: batches also carry each position's document index (documents are joined by EOS), so that
            attention stays inside a document.
        structure: batches also carry each position's enclosing spans (data_modules/structure.py), for the
            structural attention bias.
        verify_checksums: compare each prepared shard's SHA-256 with its manifest in setup (reads everything).
        tokenizer: null or `bytes`: bytes (the V1 contract); a tokenizers JSON file: its ids, into which plain
            sources are encoded in memory at setup (prepare large corpora with `prepare --tokenizer`), and
            which prepared directories must hold. `soma-lightning fit` sets it to model.arch.tokenizer.
        eos_token: the tokenizer's token that ends every document.
    """

    def __init__(
        self,
        source: str | None = None,
        val_source: str | None = None,
        test_source: str | None = None,
        val_fraction: float = 0.1,
        hf_format: Literal["text", "json", "parquet"] | None = None,
        text_column: str = "text",
        mixture: list[Corpus] | None = None,
        seq_len: int = 1024,
        batch_size: int = 16,
        val_seq_len: int = 1024,
        val_batch_size: int = 16,
        seed: int = 0,
        num_workers: int = 0,
        doc_ids: bool = False,
        structure: bool = False,
        verify_checksums: bool = False,
        tokenizer: str | None = None,
        eos_token: str = DEFAULT_EOS_TOKEN,
    ) -> None:
        super().__init__()
        require_positive(seq_len=seq_len, batch_size=batch_size, val_seq_len=val_seq_len, val_batch_size=val_batch_size)
        require_num_workers(num_workers)
        self.vocabulary = vocabulary(tokenizer or BYTES, eos_token, "data.tokenizer", DataError)
        if structure and not self.vocabulary.is_bytes:
            raise DataError(f"data.structure: the structural spans are read from bytes, not from the ids of data.tokenizer {tokenizer}; set structure false")
        if val_source is None and not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction: must be in (0, 1) when no val_source is given, got {val_fraction}")
        if mixture is not None and (source is not None or not mixture):
            raise DataError("data.mixture: a list of one or more corpora, given instead of data.source")
        self.corpora = [Corpus(**c) if isinstance(c, dict) else c for c in mixture] if mixture else [Corpus(source)] if source else []
        self.keys = [f"data.mixture[{i}]" if mixture else "data.source" for i in range(len(self.corpora))]
        for key, corpus in zip(self.keys, self.corpora):
            if corpus.weight <= 0:
                raise DataError(f"{key}.weight: must be positive, got {corpus.weight}")
            source_files(corpus.path, key)
        for key, value in (("val_source", val_source), ("test_source", test_source)):
            if value is not None:
                source_files(value, f"data.{key}")
        self.val_source, self.test_source = val_source, test_source
        self.val_fraction, self.hf_format, self.text_column = val_fraction, hf_format, text_column
        self.seq_len, self.batch_size, self.val_seq_len, self.val_batch_size = seq_len, batch_size, val_seq_len, val_batch_size
        self.seed, self.num_workers, self.verify_checksums = seed, num_workers, verify_checksums
        self.annotations = tuple(name for name, on in (("doc_ids", doc_ids), ("structure", structure)) if on)
        self.train_streams: list[Stream] | None = None
        self.prepared: dict[str, TokenShards] = {}  # absolute path -> reader, for every prepared corpus read

    def _open(self, path: str, key: str) -> Stream:
        """A prepared directory's memory-mapped stream, which must hold this corpus's vocabulary; any other
        source read into memory (and encoded)."""
        if (shards := open_prepared(path, key)) is None:
            return read_stream(path, key, self.hf_format, self.text_column, self.vocabulary)
        if shards.manifest.vocabulary != self.vocabulary.identity:
            theirs = BYTES if shards.manifest.tokenizer == BYTES else str(Path(path) / shards.manifest.tokenizer["file"])
            sha256, eos = shards.manifest.vocabulary
            raise DataError(
                f"{key}: {path} holds the ids of {theirs} (sha256 {sha256}, EOS {eos}), not of the run's tokenizer {self.vocabulary.describe()}; "
                f"train with --model.arch.tokenizer {theirs}, or prepare it again with --tokenizer {self.vocabulary.tokenizer}"
            )
        if self.verify_checksums:
            shards.verify()
        self.prepared[str(Path(path).resolve())] = shards
        return shards

    def setup(self, stage: str | None = None) -> None:
        model = getattr(self.trainer, "lightning_module", None)
        theirs = getattr(model, "vocabulary", None)  # SomaLM's; `fit` gave this module the same one, the Python API may not
        if theirs is not None and theirs.identity != self.vocabulary.identity:
            raise DataError(f"data.tokenizer: {self.vocabulary.describe()} differs from model.arch.tokenizer {theirs.describe()}; give both the same tokenizer")
        if self.train_streams is not None:
            return
        if not self.corpora:
            with resources.as_file(resources.files("soma_lightning") / "corpora" / f"{EMBEDDED}.txt") as path:
                streams = [read_stream(str(path), "data.source", vocab=self.vocabulary)]
        else:
            streams = [self._open(c.path, key) for key, c in zip(self.keys, self.corpora)]
        if self.val_source is not None:
            self.train_streams, self.val_streams = streams, [self._open(self.val_source, "data.val_source")]
        else:
            cuts = [int(len(s) * (1 - self.val_fraction)) for s in streams]  # val is never empty: cut < len
            self.train_streams, self.val_streams = [s[:c] for s, c in zip(streams, cuts)], [s[c:] for s, c in zip(streams, cuts)]
        self.test_stream = self._open(self.test_source, "data.test_source") if self.test_source else None
        for i, stream in enumerate(self.train_streams):
            if len(stream) < self.seq_len:
                of = f" of {self.corpora[i].path}" if len(self.train_streams) > 1 else ""
                raise DataError(f"data.seq_len: the train split{of} has {len(stream)} tokens, fewer than seq_len {self.seq_len}")

    @property
    def train_stream(self) -> Stream:
        """The training stream of a one-corpus source."""
        (stream,) = self.train_streams
        return stream

    @property
    def val_stream(self) -> Stream:
        """The validation stream of a one-corpus source (or of val_source)."""
        (stream,) = self.val_streams
        return stream

    def fingerprints(self) -> dict[str, str]:
        """Each prepared corpus read (absolute path) and the SHA-256 of its manifest; none for plain files."""
        return {path: reader.manifest_hash for path, reader in self.prepared.items()}

    def state_dict(self) -> dict:
        """Checkpoints record the prepared corpora they were trained on (nothing for plain files)."""
        return {"manifest_sha256": fingerprints} if (fingerprints := self.fingerprints()) else {}

    def load_state_dict(self, state: dict) -> None:
        """Refuses to resume a fit on a prepared corpus changed since the checkpoint; evaluation reads it as it is now."""
        fitting = self.trainer is None or self.trainer.state.fn == "fit"
        for path, then in state.get("manifest_sha256", {}).items():
            if fitting and path in self.prepared and (now := self.prepared[path].manifest_hash) != then:
                raise DataError(f"{self.prepared[path].key}: {path} changed since the checkpoint (manifest SHA-256 {then[:12]} then, {now[:12]} now); resume on the corpus the run trained on, or start a new run")

    def train_dataloader(self) -> DataLoader:
        """Starts at the data position: after resuming at step N, the batch an uninterrupted run would draw next."""
        weights = [c.weight for c in self.corpora] or None
        windows = RandomWindows(
            self.train_streams, self.seq_len, self.batch_size, self.seed, *data_position(self.trainer), self.annotations, weights, self.vocabulary.pad, self.vocabulary.eos,
        )
        return DataLoader(windows, batch_size=None, num_workers=self.num_workers, pin_memory=pin_memory(self.trainer))

    def _chunks(self, streams: list[Stream]) -> DataLoader:
        chunks = ConcatDataset([ContractChunks(s, self.val_seq_len, self.annotations, self.vocabulary.pad, self.vocabulary.eos) for s in streams])
        return DataLoader(chunks, batch_size=self.val_batch_size, num_workers=self.num_workers, pin_memory=pin_memory(self.trainer))

    def val_dataloader(self) -> DataLoader:
        return self._chunks(self.val_streams)

    def test_dataloader(self) -> DataLoader:
        if self.test_stream is None:
            raise DataError("data.test_source: `test` evaluates a held-out test text, and none is set; set data.init_args.test_source, or run `validate`")
        return self._chunks([self.test_stream])

    def predict_dataloader(self) -> DataLoader:
        """The test text's rows, else the validation split's."""
        return self._chunks([self.test_stream] if self.test_stream is not None else self.val_streams)
