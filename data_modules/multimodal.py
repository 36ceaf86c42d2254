"""MultimodalCorpus: text, code, images and audio as documents in one token space, pre-tokenised by
`soma-lightning prepare` into memory-mapped shards and mixed by per-source weights during training."""

from dataclasses import asdict
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from soma_lightning.data_modules.byte_corpus import DataError, RandomWindows, data_position, pin_memory, require_num_workers, require_positive
from soma_lightning.data_modules.prepare import FORMATS, Source, prepare_corpus
from soma_lightning.data_modules.shards import Shards
from soma_lightning.data_modules.tokenizers import AudioConfig, ImageConfig
from soma_lightning.errors import SpecError

# The corpus, its source type, and how it is prepared and read back.
__all__ = ["MultimodalCorpus", "Shards", "Source", "prepare_corpus"]


class MultimodalCorpus(L.LightningDataModule):
    """Trains on shards written by `soma-lightning prepare --config SPEC` (into `path`; the spec's
    model.arch.vocab_ranges is the token space). Training draws `batch_size` windows of `seq_len` per step:
    each window's source by the sources' `weight`, its offset uniformly in that source's train stream;
    batch b is a function of (seed, b) only, and a resumed run starts at the batch of its global step, so it
    draws what an uninterrupted run would. Validation: `val_batches` fixed batches of `val_batch_size` windows
    drawn the same way from the val streams (seed + 1). `on_bad_input`: what prepare does with an unreadable
    file or an id outside the token space: `skip` (printed, counted, listed in the index) or `fail`.
    `doc_ids` / `structure`: as ByteCorpus."""

    def __init__(
        self,
        path: str,
        sources: list[Source],
        image: ImageConfig = ImageConfig(),
        audio: AudioConfig = AudioConfig(),
        on_bad_input: Literal["skip", "fail"] = "fail",
        seq_len: int = 1024,
        batch_size: int = 16,
        val_batches: int = 8,
        val_batch_size: int = 16,
        seed: int = 0,
        num_workers: int = 0,
        doc_ids: bool = False,
        structure: bool = False,
    ) -> None:
        super().__init__()
        require_positive(seq_len=seq_len, batch_size=batch_size, val_batches=val_batches, val_batch_size=val_batch_size)
        require_num_workers(num_workers)
        if not sources:
            raise DataError("data.sources: expected at least one source")
        names = [s.name for s in sources]
        for i, s in enumerate(sources):
            if s.format not in FORMATS[s.kind]:
                raise DataError(f"data.sources[{i}].format: kind {s.kind} reads {' or '.join(FORMATS[s.kind])}, got {s.format}")
            if s.weight <= 0:
                raise DataError(f"data.sources[{i}].weight: must be positive, got {s.weight}")
            if names.count(s.name) > 1 or not s.name.replace("_", "").replace("-", "").isalnum():
                raise DataError(f"data.sources[{i}].name: {s.name!r} must be unique and made of letters, digits, - and _")
        self.path, self.sources, self.image, self.audio, self.on_bad_input = path, sources, image, audio, on_bad_input
        self.seq_len, self.batch_size, self.val_batches, self.val_batch_size = seq_len, batch_size, val_batches, val_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.annotations = tuple(name for name, on in (("doc_ids", doc_ids), ("structure", structure)) if on)
        self.shards: Shards | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.shards is not None:
            return
        shards = Shards.open(self.path)
        prepared = [s["name"] for s in shards.index["sources"]]
        if prepared != [s.name for s in self.sources]:
            raise DataError(f"data.sources: the spec names {[s.name for s in self.sources]}, {self.path} was prepared from {prepared}; prepare again")
        for key, mine, theirs in (("image", self.image, shards.index["image"]), ("audio", self.audio, shards.index["audio"])):
            if theirs is not None and asdict(mine) != theirs:
                raise DataError(f"data.{key}: {asdict(mine)} differs from the prepared shards' {theirs}; prepare again")
        module = self.trainer.lightning_module if self.trainer is not None else None
        ranges = getattr(getattr(module, "arch", None), "vocab_ranges", None)
        if module is not None and ranges != shards.index["vocab_ranges"]:
            raise SpecError(f"model.arch.vocab_ranges: {ranges} differs from the token space {self.path} was prepared with ({shards.index['vocab_ranges']}); prepare again")
        for s in shards.index["sources"]:
            for split, shard in s["shards"].items():
                if shard["tokens"] < self.seq_len:
                    raise DataError(f"data.seq_len: source {s['name']} has {shard['tokens']} {split} tokens, fewer than seq_len {self.seq_len}")
        self.shards = shards

    def _windows(self, split: str, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> RandomWindows:
        having = [s for s in self.sources if split in self.shards.streams[s.name]]
        if not having:
            raise DataError(f"data.sources: no source has {split} documents")
        streams = [self.shards.streams[s.name][split] for s in having]
        return RandomWindows(streams, self.seq_len, batch_size, seed, start, rank, world, self.annotations, [s.weight for s in having])

    def train_dataloader(self) -> DataLoader:
        """Starts at the data position: after resuming at step N, the batch an uninterrupted run would draw next."""
        windows = self._windows("train", self.batch_size, self.seed, *data_position(self.trainer))
        return DataLoader(windows, batch_size=None, num_workers=self.num_workers, pin_memory=pin_memory(self.trainer))

    def val_dataloader(self) -> DataLoader:
        _, rank, world = data_position(self.trainer)
        windows = self._windows("val", self.val_batch_size, self.seed + 1, 0, rank, world)
        return DataLoader([windows.batch(b) for b in range(self.val_batches)], batch_size=None, pin_memory=pin_memory(self.trainer))
