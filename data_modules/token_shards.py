"""TokenShards: a prepared corpus (shard_format.py) read as one token stream, memory-mapped.

The stream is the shards in manifest order, each document followed by EOS, which is inserted on read: it
is as long as the corpus's tokens plus its documents. A read finds its shard by np.searchsorted on the
shards' cumulative lengths (from the manifest) and the documents it crosses by bisecting the shard's
memory-mapped document starts, so a process holds nothing per document and its memory does not grow with
the corpus.
"""

import bisect
import os
import resource
from collections import OrderedDict
from pathlib import Path

import numpy as np

from soma_lightning.errors import DataError
from soma_lightning.data_modules.shard_format import MANIFEST, SHARDS, Manifest, Shard, is_prepared, manifest_hash
from soma_lightning.vocabulary import file_sha256

# Each memory map holds a file descriptor: a process keeps at most this many shards (two maps each) open, a
# quarter of its limit on open files, closing the least recently read first.
_FILES = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
OPEN_SHARDS = 4096 if _FILES == resource.RLIM_INFINITY else max(16, min(4096, _FILES // 4))
# Maps take address space: under a limit on it (RLIMIT_AS), the open shards take at most a quarter of it.
_ADDRESS_SPACE = resource.getrlimit(resource.RLIMIT_AS)[0]


class TokenShards:
    """The token stream of a prepared directory, used like a memory-mapped 1-D array: `len(shards)` tokens,
    `shards.read(start, length)` returns tokens as int64, `shards[start:stop]` is a view of a part (no read),
    `np.asarray(view)` reads it. So RandomWindows and ContractChunks read it as they read an array.

    Opening checks every shard's size with a `stat`; shards are memory-mapped on first read. A pickled reader
    (a DataLoader worker's copy) carries paths only and maps the shards again.
    """

    def __init__(self, root: str | os.PathLike, key: str = "data.source") -> None:
        self.root, self.key = Path(root), key
        self.manifest = Manifest.read(self.root, key)
        self.manifest_hash = manifest_hash(self.root)
        self.dtype, self.eos = np.dtype(self.manifest.dtype), self.manifest.eos
        for shard in self.manifest.shards:
            self._check_size(shard)
        lengths = [s.tokens + s.documents for s in self.manifest.shards]
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # shard i: [offsets[i], offsets[i + 1])
        self.start, self.stop = 0, int(self.offsets[-1])
        largest = max((s.tokens * self.dtype.itemsize + 8 * s.documents for s in self.manifest.shards), default=1)
        self.max_open = OPEN_SHARDS if _ADDRESS_SPACE == resource.RLIM_INFINITY else max(1, min(OPEN_SHARDS, _ADDRESS_SPACE // 4 // largest))
        self._maps: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _check_size(self, shard: Shard) -> None:
        bin_path, docs_path = shard.paths(self.root)
        expected = shard.tokens * self.dtype.itemsize
        try:
            found = f"{bin_path.stat().st_size} bytes"
        except OSError:
            found = "no file"
        if found != f"{expected} bytes":
            raise DataError(f"{self.key}: {bin_path} should hold {shard.tokens} {self.dtype} tokens ({expected} bytes), found {found}; prepare again")
        if not docs_path.is_file():
            raise DataError(f"{self.key}: {docs_path} is missing; prepare again")

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice) -> "TokenShards":
        """Tokens [start, stop) of this stream as a stream of their own, as numpy slices a 1-D array."""
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("TokenShards slices are contiguous")
        part = object.__new__(TokenShards)
        part.__dict__.update(self.__dict__, start=self.start + start, stop=self.start + max(start, stop))  # shares the open shards
        return part

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        tokens = self.read(0, len(self))
        return tokens if dtype is None else tokens.astype(dtype, copy=False)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, int64, across documents and shards."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) of a stream of {len(self)}")
        out = np.empty(length, dtype=np.int64)
        position, end = self.start + start, self.start + start + length
        shard = int(np.searchsorted(self.offsets, position, side="right")) - 1
        while position < end:
            n = min(end, int(self.offsets[shard + 1])) - position
            if n > 0:
                done = position - self.start - start
                out[done : done + n] = self._read_shard(shard, position - int(self.offsets[shard]), n)
                position += n
            shard += 1
        return out

    def _read_shard(self, i: int, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of shard i's stream. Document j's EOS sits at docs[j + 1] + j (its end
        in the shard's tokens, plus the EOS of the documents before it)."""
        tokens, docs = self._open(i)

        def eos_at(j: int) -> int:
            return int(docs[j + 1]) + j

        documents = range(len(docs) - 1)
        first = bisect.bisect_left(documents, start, key=eos_at)  # EOS before the read
        last = bisect.bisect_left(documents, start + length, lo=first, key=eos_at)  # EOS before its end
        is_eos = np.zeros(length, dtype=bool)
        is_eos[docs[first + 1 : last + 1] + np.arange(first, last) - start] = True
        out = np.empty(length, dtype=np.int64)
        out[is_eos] = self.eos
        out[~is_eos] = tokens[start - first : start - first + length - (last - first)]
        return out

    def _open(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._maps:
            self._maps.move_to_end(i)
            return self._maps[i]
        while len(self._maps) >= self.max_open:
            self._maps.popitem(last=False)
        shard = self.manifest.shards[i]
        bin_path, docs_path = shard.paths(self.root)
        # Plain ndarray views of the maps: np.memmap adds overhead to every index taken while bisecting.
        tokens = np.memmap(bin_path, dtype=self.dtype, mode="r").view(np.ndarray) if shard.tokens else np.zeros(0, dtype=self.dtype)
        docs = np.load(docs_path, mmap_mode="r").view(np.ndarray)
        if docs.shape != (shard.documents + 1,):
            raise DataError(f"{self.key}: {docs_path} should hold {shard.documents + 1} document starts, found shape {docs.shape}; prepare again")
        self._maps[i] = tokens, docs
        return tokens, docs

    def verify(self) -> None:
        """Compare every shard's SHA-256 with the manifest's (reads the whole corpus): a DataError names the
        first that differs."""
        for shard in self.manifest.shards:
            bin_path = shard.paths(self.root)[0]
            if (found := file_sha256(bin_path)) != shard.sha256:
                raise DataError(f"{self.key}: {bin_path} has SHA-256 {found}, the manifest records {shard.sha256}; the shard changed since it was prepared: prepare again")

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_maps": OrderedDict()}


def open_prepared(path: str, key: str) -> TokenShards | None:
    """The stream of a prepared directory; None for any other source. Shards without a manifest (which prepare
    writes last) are an unfinished prepare, a DataError rather than files to read as text."""
    if is_prepared(path):
        return TokenShards(path, key)
    if any((Path(path) / SHARDS).glob("*.docs.npy")):
        raise DataError(f"{key}: {path} holds shards but no {MANIFEST}, so its prepare did not finish; prepare again")
    return None
