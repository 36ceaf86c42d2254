"""MultimodalCorpus: text, code, images and audio as documents in one token space, pre-tokenised by
`soma-lightning prepare` into memory-mapped shards and mixed by per-source weights during training."""

import csv
import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.data_modules.byte_corpus import DataError, RandomWindows, hf_column, require_num_workers, require_positive, source_files
from soma_lightning.data_modules.contract import EOS
from soma_lightning.data_modules.modalities import (
    AudioConfig, AudioTokenizer, BadInput, ImageConfig, ImageTokenizer, TokenSpace, framed, read_wav, text_ids,
)
from soma_lightning.spec import SpecError

INDEX = "index.json"
FORMATS = {
    "text": ("files", "text", "json", "parquet"),
    "code": ("files", "text", "json", "parquet"),
    "image_label": ("imagefolder",),
    "audio_transcript": ("audiofolder",),
    "tokens": ("json", "parquet"),
}
DEFAULT_COLUMN = {"text": "text", "code": "text", "image_label": "label", "audio_transcript": "transcription", "tokens": "tokens"}
# How a document lays out its parts; documents.npy stores the index into this tuple.
LAYOUTS = ("text", "code", "image_then_label", "label_then_image", "audio_then_transcript", "transcript_then_audio", "tokens")
DOCUMENT_DTYPE = np.dtype([("source", "<i2"), ("split", "<i1"), ("layout", "<i1"), ("offset", "<i8"), ("length", "<i4")])
SPLITS = ("train", "val")
WRITTEN = re.compile(r"[\w-]+(\.(train|val))?\.[0-9a-f]{12}\.(bin|npy)")  # the names _write_array gives


@dataclass
class Source:
    """One corpus of the mix.
    `kind`: text or code (a document per file with `format: files`, or per row of the `column` of HF
    text/json/parquet files, a text row being a file, paragraph or line by `sample_by`); image_label (an HF
    imagefolder: each image with its class name, underscores read as spaces); audio_transcript (the
    audiofolder layout: WAVs and a metadata.csv with `file_name` and `column`); tokens (pre-tokenised: a
    json/parquet column of id lists, each id checked against the token space).
    `order` (image_label, audio_transcript): the modality then its text, the text then the modality, or both
    documents. Validation documents: those of `val_path`, else `val_fraction` of the documents, picked with
    the seed. `weight`: this source's share of the training windows (weights are normalised). `max_documents`:
    use only the first N documents of `path` (in path order)."""

    name: str
    kind: Literal["text", "code", "image_label", "audio_transcript", "tokens"]
    path: str
    format: Literal["files", "text", "json", "parquet", "imagefolder", "audiofolder"] = "files"
    column: str | None = None
    sample_by: Literal["document", "paragraph", "line"] = "document"
    val_path: str | None = None
    val_fraction: float = 0.05
    weight: float = 1.0
    order: Literal["both", "modality_first", "text_first"] = "both"
    max_documents: int | None = None


class Skips:
    """Bad inputs: `fail` re-raises; `skip` prints each (file and reason) and keeps them for the index."""

    def __init__(self, policy: str) -> None:
        self.policy, self.items = policy, []

    def __call__(self, source: str, error: BadInput) -> None:
        if self.policy == "fail":
            raise BadInput(f"data.sources ({source}): {error} (on_bad_input: fail)") from None
        print(f"soma-lightning prepare: skipped {error} (source {source})", file=sys.stderr)
        self.items.append({"source": source, "reason": str(error)})


# ---------------------------------------------------------------- reading sources


def _records(source: Source, path: str, key: str) -> list[tuple[str, object]]:
    """(name, raw) per document of one path of a source, in path order, unread where reading can fail."""
    column = source.column or DEFAULT_COLUMN[source.kind]
    if source.kind in ("text", "code") and source.format == "files":
        records = [(str(f), f) for f in source_files(path, key)]
    elif source.kind in ("text", "code", "tokens"):
        rows = hf_column(path, key, source.format, column, source.sample_by)
        records = [(f"{path}[row {i}]", row) for i, row in enumerate(rows)]
    elif source.kind == "image_label":
        records = _imagefolder(path, key, column)
    else:
        records = _audiofolder(path, key, column)
    return records[: source.max_documents]


def _imagefolder(path: str, key: str, column: str) -> list[tuple[str, object]]:
    """Rows of an HF imagefolder, CLASS/IMAGE files under `path` (one split's folder, e.g. DATA/train):
    (file, (file, bytes, label)). Every file is passed to the loader explicitly: given only the folder,
    datasets infers splits from file names and silently leaves out files that match no split's name (a
    `broken.png` beside `train_00001.png`). Images are read later, one by one, so that a bad file can be skipped."""
    import datasets

    if not Path(path).is_dir():
        raise DataError(f"{key}: {path!r} is not a directory (an imagefolder: CLASS/IMAGE files)")
    try:
        ds = datasets.load_dataset("imagefolder", data_files={"train": [str(f) for f in source_files(path, key)]}, split="train")
    except Exception as e:
        raise DataError(f"{key}: cannot load {path!r} as an imagefolder ({type(e).__name__}: {e})") from None
    if column not in ds.column_names:
        raise DataError(f"{key}: imagefolder {path!r} has no column {column!r} (class subfolders give `label`); columns: {', '.join(ds.column_names)}")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    names = ds.features[column].names if hasattr(ds.features[column], "names") else None
    out = []
    for row in ds:
        label = names[row[column]] if names else str(row[column])
        file = row["image"]["path"] or f"{path}[row {len(out)}]"
        out.append((file, (file, row["image"]["bytes"], label.replace("_", " "))))
    return out


def _audiofolder(path: str, key: str, column: str) -> list[tuple[str, object]]:
    """The audiofolder layout read directly (datasets' audiofolder builder needs torchcodec even without
    decoding): metadata.csv rows -> (file, transcript)."""
    metadata = Path(path) / "metadata.csv"
    if not metadata.is_file():
        raise DataError(f"{key}: {path!r} has no metadata.csv (the audiofolder layout: file_name,{column},...)")
    try:
        with open(metadata, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{metadata}: cannot read ({e})") from None
    if not rows or "file_name" not in rows[0] or column not in rows[0]:
        raise DataError(f"{metadata}: expected the columns file_name and {column}, got {', '.join(rows[0]) if rows else 'no rows'}")
    return [(str(Path(path) / r["file_name"]), r[column]) for r in rows]


def _split(records: list, fraction: float, seed: int, key: str) -> tuple[list, list]:
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"{key}.val_fraction: must be in [0, 1), got {fraction}")
    n_val = int(round(fraction * len(records)))
    if fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= len(records) and fraction > 0:
        raise DataError(f"{key}: {len(records)} document(s) cannot be split into train and val (val_fraction {fraction}); give val_path, or more documents (sample_by: paragraph or line for one text file)")
    val = set(np.random.default_rng(seed).permutation(len(records))[:n_val].tolist())
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


# ---------------------------------------------------------------- tokenising


def _load(kind: str, name: str, raw: object, image: ImageTokenizer | None, audio: AudioTokenizer | None) -> object:
    """Read one record (the step where a bad file shows): bytes, (pixels, label), (ids, transcript) or ids."""
    if kind in ("text", "code"):
        if not isinstance(raw, Path):
            return str(raw).encode()
        try:
            return raw.read_bytes()
        except OSError as e:
            raise BadInput(f"{name}: unreadable file ({e.strerror or e})") from None
    if kind == "image_label":
        file, data, label = raw
        return image.read(file, data), label
    if kind == "audio_transcript":
        samples, rate = read_wav(name)
        return audio.encode(samples, rate), raw
    try:
        return np.asarray(raw, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise BadInput(f"{name}: expected a list of token ids ({e})") from None


def _documents(source: Source, item: object, space: TokenSpace, image: ImageTokenizer | None) -> list[tuple[str, np.ndarray]]:
    """(layout, ids) of the documents one loaded item makes."""
    if source.kind == "text":
        return [("text", framed(space, "text", text_ids(item)))]
    if source.kind == "code":
        return [("code", framed(space, "code", text_ids(item) + space.code_offset()))]
    if source.kind == "tokens":
        return [("tokens", item)]
    body, text = item
    modality, parts = ("image", image.encode(body)) if source.kind == "image_label" else ("audio", body)
    first, second = framed(space, modality, parts), framed(space, "text", text_ids(text))
    names = ("image_then_label", "label_then_image") if modality == "image" else ("audio_then_transcript", "transcript_then_audio")
    docs = []
    if source.order in ("both", "modality_first"):
        docs.append((names[0], np.concatenate([first, second])))
    if source.order in ("both", "text_first"):
        docs.append((names[1], np.concatenate([second, first])))
    return docs


def _write_array(out: Path, stem: str, array: np.ndarray, suffix: Literal["bin", "npy"]) -> str:
    """Write atomically as STEM.DIGEST.SUFFIX (digest of the content; raw bytes or .npy) and return the file
    name: an existing index keeps pointing at its own files until the new index replaces it."""
    name = f"{stem}.{hashlib.sha256(array.tobytes()).hexdigest()[:12]}.{suffix}"

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            if suffix == "bin":
                f.write(array.tobytes())
            else:
                np.save(f, array)

    atomic_write(out / name, write)
    return name


def prepare_corpus(data: "MultimodalCorpus", vocab_ranges: dict[str, list[int]] | None, out: str | None = None) -> dict:
    """Tokenise every source of `data` into shards under `out` (default data.path): per source and split a
    uint16 stream of documents each followed by EOS, documents.npy (source, split, layout, offset, length per
    document), the image codebook in VQ mode, and index.json (written last). Returns the index."""
    space = TokenSpace(vocab_ranges)
    root = Path(out or data.path)
    kinds = {s.kind for s in data.sources}
    image = ImageTokenizer(data.image, space) if "image_label" in kinds else None
    audio = AudioTokenizer(data.audio, space) if "audio_transcript" in kinds else None
    if "code" in space.ranges:
        space.need("code", 256, "code bytes")
    skips = Skips(data.on_bad_input)
    root.mkdir(parents=True, exist_ok=True)

    loaded: list[dict[str, list]] = []
    for i, s in enumerate(data.sources):
        key = f"data.sources[{i}]"
        records = _records(s, s.path, f"{key}.path")
        if s.val_path is not None:
            parts = {"train": records, "val": _records(s, s.val_path, f"{key}.val_path")}
        else:
            parts = dict(zip(SPLITS, _split(records, s.val_fraction, data.seed + i, key)))
        items = {}
        for split, recs in parts.items():
            items[split] = []
            for name, raw in recs:
                try:
                    items[split].append((name, _load(s.kind, name, raw, image, audio)))
                except BadInput as e:
                    skips(s.name, e)
        loaded.append(items)

    codebook_file = None
    if image is not None and data.image.patch is not None:
        train_images = [item[0] for s, items in zip(data.sources, loaded) if s.kind == "image_label" for _, item in items["train"]]
        image.fit(train_images, data.seed)
        codebook_file = _write_array(root, "image_codebook", image.codebook, "npy")

    documents, sources = [], []
    for i, (s, items) in enumerate(zip(data.sources, loaded)):
        shards = {}
        for split_index, split in enumerate(SPLITS):
            pieces, offset, count = [], 0, 0
            for name, item in items[split]:
                for layout, ids in _documents(s, item, space, image):
                    bad = space.outside(ids)
                    if bad is not None:
                        skips(s.name, BadInput(f"{name}: token id {int(ids[bad])} at index {bad} is outside the token space {space.ranges}"))
                        continue
                    pieces += [ids, [EOS]]
                    documents.append((i, split_index, LAYOUTS.index(layout), offset, len(ids)))
                    offset, count = offset + len(ids) + 1, count + 1
            if split == "train" and not pieces:
                raise DataError(f"data.sources[{i}] ({s.name}): no training documents left")
            if pieces:
                stream = np.concatenate(pieces).astype(np.uint16)
                shards[split] = {"file": _write_array(root, f"{s.name}.{split}", stream, "bin"), "tokens": len(stream), "documents": count}
        sources.append({"name": s.name, "kind": s.kind, "shards": shards, "skipped": sum(1 for k in skips.items if k["source"] == s.name)})

    index = {
        "format": 1,
        "vocab_ranges": {k: list(v) for k, v in space.ranges.items()},
        "image": asdict(data.image) if image else None,
        "audio": asdict(data.audio) if audio else None,
        "image_codebook": codebook_file,
        "layouts": list(LAYOUTS),
        "documents": _write_array(root, "documents", np.array(documents, dtype=DOCUMENT_DTYPE), "npy"),
        "sources": sources,
        "skipped": skips.items,
    }
    atomic_write(root / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    keep = {index["documents"], codebook_file} | {sh["file"] for s in sources for sh in s["shards"].values()}
    for f in root.iterdir():  # files of earlier prepares, no longer referenced
        if f.name not in keep and WRITTEN.fullmatch(f.name):
            f.unlink()
    return index


# ---------------------------------------------------------------- reading prepared shards


@dataclass
class Shards:
    """A prepared directory: its index, the token space and tokenizers it was made with, and per source the
    memory-mapped train and val streams."""

    root: Path
    index: dict
    space: TokenSpace
    image: ImageTokenizer | None
    audio: AudioTokenizer | None
    streams: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str, key: str = "data.path") -> "Shards":
        root = Path(path)
        if not (root / INDEX).is_file():
            raise DataError(f"{key}: {path!r} holds no prepared corpus ({INDEX}); run `soma-lightning prepare --config SPEC --out {path}` first")
        index = json.loads((root / INDEX).read_text())
        space = TokenSpace(index["vocab_ranges"])
        image = None
        if index["image"] is not None:
            codebook = np.load(root / index["image_codebook"]) if index["image_codebook"] else None
            image = ImageTokenizer(ImageConfig(**index["image"]), space, codebook)
        audio = AudioTokenizer(AudioConfig(**index["audio"]), space) if index["audio"] is not None else None
        shards = cls(root, index, space, image, audio)
        for s in index["sources"]:
            shards.streams[s["name"]] = {}
            for split, shard in s["shards"].items():
                file = root / shard["file"]
                size = file.stat().st_size if file.is_file() else -1
                if size != 2 * shard["tokens"]:
                    raise DataError(f"{file}: expected {shard['tokens']} tokens ({2 * shard['tokens']} bytes), found {'no file' if size < 0 else f'{size} bytes'}; prepare again")
                shards.streams[s["name"]][split] = np.memmap(file, dtype=np.uint16, mode="r")
        return shards

    def documents(self) -> np.ndarray:
        return np.load(self.root / self.index["documents"])

    def document(self, i: int) -> np.ndarray:
        """The ids of document i of documents.npy."""
        d = self.documents()[i]
        source = self.index["sources"][d["source"]]["name"]
        return np.asarray(self.streams[source][SPLITS[d["split"]]][d["offset"] : d["offset"] + d["length"]], dtype=np.int64)


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

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        """Starts at the data position: after resuming at step N, the batch an uninterrupted run would draw next."""
        start = self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer is not None else 0
        windows = self._windows("train", self.batch_size, self.seed, start, *self._rank())
        return DataLoader(windows, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        windows = self._windows("val", self.val_batch_size, self.seed + 1, 0, *self._rank())
        return DataLoader([windows.batch(b) for b in range(self.val_batches)], batch_size=None)
