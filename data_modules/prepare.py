"""`soma-lightning prepare`: the sources of a multimodal corpus read, split into train and val, tokenised into
one token space and written as shards (shards.py)."""

import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.data_modules.byte_corpus import DataError, hf_column, source_files
from soma_lightning.data_modules.contract import EOS
from soma_lightning.data_modules.modalities import BadInput, TokenSpace, framed, text_ids
from soma_lightning.data_modules.shards import DOCUMENT_DTYPE, INDEX, LAYOUTS, SPLITS, WRITTEN, write_array
from soma_lightning.data_modules.tokenizers import AudioTokenizer, ImageTokenizer, read_wav

if TYPE_CHECKING:
    from soma_lightning.data_modules.multimodal import MultimodalCorpus

# The formats each kind of source can be read from, and the column read by default.
FORMATS = {
    "text": ("files", "text", "json", "parquet"),
    "code": ("files", "text", "json", "parquet"),
    "image_label": ("imagefolder",),
    "audio_transcript": ("audiofolder",),
    "tokens": ("json", "parquet"),
}
DEFAULT_COLUMN = {"text": "text", "code": "text", "image_label": "label", "audio_transcript": "transcription", "tokens": "tokens"}


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
        codebook_file = write_array(root, "image_codebook", image.codebook, "npy")

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
                shards[split] = {"file": write_array(root, f"{s.name}.{split}", stream, "bin"), "tokens": len(stream), "documents": count}
        sources.append({"name": s.name, "kind": s.kind, "shards": shards, "skipped": sum(1 for k in skips.items if k["source"] == s.name)})

    index = {
        "format": 1,
        "vocab_ranges": {k: list(v) for k, v in space.ranges.items()},
        "image": asdict(data.image) if image else None,
        "audio": asdict(data.audio) if audio else None,
        "image_codebook": codebook_file,
        "layouts": list(LAYOUTS),
        "documents": write_array(root, "documents", np.array(documents, dtype=DOCUMENT_DTYPE), "npy"),
        "sources": sources,
        "skipped": skips.items,
    }
    atomic_write(root / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    keep = {index["documents"], codebook_file} | {sh["file"] for s in sources for sh in s["shards"].values()}
    for f in root.iterdir():  # files of earlier prepares, no longer referenced
        if f.name not in keep and WRITTEN.fullmatch(f.name):
            f.unlink()
    return index
