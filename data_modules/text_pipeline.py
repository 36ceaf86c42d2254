"""The datatrove pipeline steps of `soma-lightning prepare` for text corpora: a reader per input format and
ShardWriter, which writes the token shards of shard_format.py.

Each task reads a contiguous range of the sorted input files (listed in OUT/.prepare/files.jsonl, one
`[path, size]` per line), so a task's documents, and the shards it writes, depend only on the inputs and
the number of tasks. Readers yield one datatrove Document per file or record: `text` is a str, or bytes
for raw files, which are never decoded. A record that cannot be read travels as a Document carrying a
`skipped` reason, so that ShardWriter, which records the task's result, counts it.
"""

import io
import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import zstandard
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import open_file
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.data_modules.shard_format import ShardFile

SKIPPED = "skipped"  # a Document's metadata key: why it was not read
MISSING = object()
# What reading a corrupt or unreadable input raises (pyarrow's errors are OSError or ValueError).
UNREADABLE = (OSError, EOFError, ValueError, zstandard.ZstdError)


def skipped(id: str, reason: str) -> Document:
    return Document(text="", id=id, metadata={SKIPPED: reason})


def task_files(files_list: str, bounds: list[int], rank: int) -> list[str]:
    """The paths task `rank` reads: lines bounds[rank] to bounds[rank + 1] of the files list."""
    with open(files_list) as f:
        return [json.loads(line)[0] for line in itertools.islice(f, bounds[rank], bounds[rank + 1])]


class FileReader(PipelineStep):
    """This task's files, each read by `read`. A file that fails midway keeps the documents read before the
    failure and counts as one `unreadable file`."""

    type = "📖 - READER"

    def __init__(self, files_list: str, bounds: list[int], text_column: str = "text") -> None:
        super().__init__()
        self.files_list, self.bounds, self.text_column = files_list, bounds, text_column

    def read(self, path: str) -> Iterator[Document]:
        raise NotImplementedError

    def text_document(self, value: object, id: str) -> Document:
        if value is MISSING:
            return skipped(id, "missing text column")
        if not isinstance(value, (str, bytes)):
            return skipped(id, "text not a string")
        return Document(text=value, id=id)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if world_size != len(self.bounds) - 1:
            raise ValueError(f"this pipeline was planned for {len(self.bounds) - 1} tasks; run it with tasks={len(self.bounds) - 1}, not {world_size}")
        if data:
            yield from data
        for path in task_files(self.files_list, self.bounds, rank):
            self.stat_update("input_files")
            try:
                yield from self.read(path)
            except UNREADABLE as e:
                logger.warning(f"{path}: unreadable ({type(e).__name__}: {e})")
                yield skipped(path, "unreadable file")


class RawFiles(FileReader):
    """Each file is one document of raw bytes."""

    name = "raw files"

    def read(self, path: str) -> Iterator[Document]:
        with open(path, "rb") as f:
            yield Document(text=f.read(), id=path)  # bytes are the token space: never decoded


def zstd_chunks(f: io.RawIOBase) -> Iterator[bytes]:
    """The decompressed bytes of a .zst stream of one or more frames. A truncated last frame raises
    ZstdError: zstandard's stream_reader would end silently instead."""
    decompressor = zstandard.ZstdDecompressor()
    frame, started = decompressor.decompressobj(), False
    while chunk := f.read(1 << 22):
        while chunk:
            yield frame.decompress(chunk)
            started, chunk = True, b""
            if frame.eof:
                frame, started, chunk = decompressor.decompressobj(), False, frame.unused_data
    if started and not frame.eof:
        raise zstandard.ZstdError("the file ends inside a frame (truncated)")


def file_lines(path: str) -> Iterator[bytes]:
    """The lines of a plain, .gz or .zst file, without their newline."""
    zst = path.endswith(".zst")
    with open_file(path, mode="rb", compression=None if zst else "infer") as f:
        tail = b""
        # read1: what was decompressed before a damaged part of a .gz file comes out before the error
        for chunk in zstd_chunks(f) if zst else iter(lambda: f.read1(1 << 22), b""):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            yield from lines
        if tail:
            yield tail


class JsonlRecords(FileReader):
    """JSON lines (plain, .gz or .zst): a document per line, its `text_column` field."""

    name = "jsonl"

    def read(self, path: str) -> Iterator[Document]:
        import orjson

        for number, line in enumerate(file_lines(path), 1):
            if not line.strip():
                continue
            id = f"{path}:{number}"
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                yield skipped(id, "invalid utf-8" if "UTF-8" in str(e) else "invalid json")
                continue
            yield self.text_document(row.get(self.text_column, MISSING), id) if isinstance(row, dict) else skipped(id, "not a json object")


class _ArrowBatches(FileReader):
    """A document per row of the text column of a file's Arrow record batches."""

    def batches(self, path: str) -> Iterator:
        raise NotImplementedError

    def read(self, path: str) -> Iterator[Document]:
        row = 0
        for batch in self.batches(path):
            if self.text_column not in batch.schema.names:
                yield skipped(path, "missing text column")
                return
            for value in batch.column(self.text_column).to_pylist():
                yield self.text_document(value, f"{path}#{row}")
                row += 1


class ParquetRecords(_ArrowBatches):
    name = "parquet"

    def batches(self, path: str) -> Iterator:
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as f:
            columns = [self.text_column] if self.text_column in f.schema_arrow.names else None
            yield from f.iter_batches(batch_size=1024, columns=columns)


class ArrowRecords(_ArrowBatches):
    """The Arrow stream files of a dataset saved with `datasets`' save_to_disk."""

    name = "arrow (save_to_disk)"

    def batches(self, path: str) -> Iterator:
        import pyarrow as pa

        with pa.memory_map(path) as source:
            yield from pa.ipc.open_stream(source)


READERS: dict[str | None, type[FileReader]] = {None: RawFiles, "json": JsonlRecords, "parquet": ParquetRecords, "arrow": ArrowRecords}


def encoder(tokenizer_file: str | None, dtype: str) -> Callable[[str | bytes], bytes]:
    """A document's text -> its stored tokens as bytes: the text's bytes (str as UTF-8), or the tokenizer's
    ids in `dtype`. Raises UnicodeError for text that has no UTF-8 form (or, with a tokenizer, bytes that
    are not UTF-8)."""
    if tokenizer_file is None:
        return lambda text: text if isinstance(text, bytes) else text.encode()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_file)

    def encode(text: str | bytes) -> bytes:
        text = text.decode() if isinstance(text, bytes) else text
        return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=dtype).tobytes()

    return encode


def task_result_path(state_dir: str | Path, rank: int) -> Path:
    return Path(state_dir) / "tasks" / f"{rank:05d}.json"


class ShardWriter(PipelineStep):
    """The last step: documents -> OUT/shards/TASK-INDEX.bin and .docs.npy, a shard closed before the next
    document would take it past `shard_size` bytes (a larger document gets a shard of its own). When the
    task's documents are done, its result (shards, skips by reason with a first example) is written
    atomically to OUT/.prepare/tasks/TASK.json. A task that reruns rewrites the same shards."""

    name = "soma token shards"
    type = "💽 - WRITER"

    def __init__(self, out: str, state_dir: str, shard_size: int, dtype: str, tokenizer_file: str | None = None) -> None:
        super().__init__()
        self.out, self.state_dir, self.shard_size = out, state_dir, shard_size
        self.dtype, self.tokenizer_file = dtype, tokenizer_file

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        encode, itemsize = encoder(self.tokenizer_file, self.dtype), np.dtype(self.dtype).itemsize
        shards, skips, examples = [], Counter(), {}
        shard: ShardFile | None = None
        for document in data or ():
            reason, tokens = document.metadata.get(SKIPPED), b""
            if reason is None:
                try:
                    tokens = encode(document.text)
                except UnicodeError:
                    reason = "invalid utf-8"
            if reason is None and not tokens:
                reason = "empty"
            if reason is not None:
                skips[reason] += 1
                examples.setdefault(reason, document.id)
                self.stat_update(f"skipped: {reason}")
                continue
            if shard is not None and shard.nbytes + len(tokens) > self.shard_size:
                shards.append(shard.close())
                shard = None
            if shard is None:
                shard = ShardFile(Path(self.out), f"{rank:05d}-{len(shards):05d}", itemsize)
            shard.add(tokens)
            yield document
        if shard is not None:
            shards.append(shard.close())
        # counted once per task: a stat update per document took 10% of the time
        self.stat_update("documents", value=sum(s.documents for s in shards), unit="task")
        self.stat_update("tokens", value=sum(s.tokens for s in shards), unit="task")
        result = {"shards": [vars(s) for s in shards], "skipped": dict(sorted(skips.items())), "examples": examples}
        atomic_write(task_result_path(self.state_dir, rank), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
