"""The prepared form of a text corpus at scale, which `soma-lightning prepare` writes and the data modules read
memory-mapped.

    OUT/manifest.json          written last (atomically): what follows, and which shards make the corpus
    OUT/shards/NAME.bin        a shard's tokens, documents back to back, raw little-endian `dtype`
    OUT/shards/NAME.docs.npy   int64 [documents + 1]: each document's first token in NAME.bin, then its length

ShardFile writes one shard (prepare's ShardWriter, text_pipeline.py); Manifest.write lists them.

The corpus is the shards in manifest order, each document followed by EOS: EOS is not stored, so raw bytes
stay uint8 (one byte per byte of text). Token spaces wider than a byte are uint16 or uint32, by vocabulary
size. Shards are named by the prepare task that wrote them and their number within it (TASK-INDEX).
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.errors import DataError

FORMAT = "soma-token-shards/1"
MANIFEST = "manifest.json"
SHARDS = "shards"


def dtype_for(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every token id below vocab_size (EOS is never stored)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise DataError(f"tokenizer: a vocabulary of {vocab_size} ids does not fit in uint32")


@dataclass
class Shard:
    name: str
    tokens: int
    documents: int
    sha256: str  # of NAME.bin

    def paths(self, root: Path) -> tuple[Path, Path]:
        return root / SHARDS / f"{self.name}.bin", root / SHARDS / f"{self.name}.docs.npy"


@dataclass
class Manifest:
    dtype: str  # numpy dtype name of the stored tokens: uint8, uint16 or uint32
    eos: int  # the token id placed after every document when the corpus is read
    tokenizer: str | dict  # "bytes", or {"file": NAME in OUT, "sha256": ..., "vocab_size": N}
    shards: list[Shard] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # records not read, by reason
    sources: list[str] = field(default_factory=list)
    format: str = FORMAT

    @property
    def vocabulary(self) -> tuple[str, int]:
        """Which ids the shards hold, in Vocabulary.identity's form: ("bytes", EOS) or (the tokenizer file's sha256, EOS)."""
        return self.tokenizer if isinstance(self.tokenizer, str) else self.tokenizer["sha256"], self.eos

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    def write(self, root: Path) -> None:
        text = json.dumps(asdict(self) | {"tokens": self.tokens, "documents": self.documents}, indent=1) + "\n"
        atomic_write(root / MANIFEST, lambda tmp: tmp.write_text(text))

    @staticmethod
    def read(root: Path, key: str = "data.source") -> "Manifest":
        path = root / MANIFEST
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise DataError(f"{key}: {path} is format {raw.get('format')!r}; this version reads {FORMAT}")
            shards = [Shard(**s) for s in raw["shards"]]
            return Manifest(raw["dtype"], raw["eos"], raw["tokenizer"], shards, raw.get("skipped", {}), raw.get("sources", []))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{key}: {path} is not a readable manifest of prepared shards ({type(e).__name__}: {e})") from None


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def manifest_hash(root: Path) -> str:
    """SHA-256 of manifest.json: it names every shard with its checksum, so it fingerprints the corpus."""
    return hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()


FLUSH_BYTES = 1 << 24  # a shard's documents are written in pieces of about this size


class ShardFile:
    """One shard being written: documents appended to NAME.bin.tmp, renamed into place by close()."""

    def __init__(self, root: Path, name: str, itemsize: int) -> None:
        self.name, self.itemsize = name, itemsize
        self.bin, self.docs = Shard(name, 0, 0, "").paths(root)
        self.bin.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.bin.with_name(self.bin.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.pending = bytearray()
        self.starts: list[int] = []
        self.nbytes = 0

    def add(self, tokens: bytes) -> None:
        self.starts.append(self.nbytes // self.itemsize)
        self.pending += tokens
        self.nbytes += len(tokens)
        if len(self.pending) >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        self.sha.update(self.pending)
        self.file.write(self.pending)
        self.pending.clear()

    def close(self) -> Shard:
        self._flush()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.bin)
        starts = np.array([*self.starts, self.nbytes // self.itemsize], dtype=np.int64)
        atomic_write(self.docs, lambda tmp: _save(tmp, starts))
        return Shard(self.name, self.nbytes // self.itemsize, len(self.starts), self.sha.hexdigest())


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to a path's name
        np.save(f, array)
