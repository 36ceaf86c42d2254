"""The prepared form of a multimodal corpus, which prepare.py writes and MultimodalCorpus reads: index.json
(written last), per source and split a uint16 stream of documents each followed by EOS, documents.npy, and
the image codebook in VQ mode."""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.data_modules.byte_corpus import DataError
from soma_lightning.data_modules.modalities import TokenSpace
from soma_lightning.data_modules.tokenizers import AudioConfig, AudioTokenizer, ImageConfig, ImageTokenizer

INDEX = "index.json"
# How a document lays out its parts; documents.npy stores the index into this tuple.
LAYOUTS = ("text", "code", "image_then_label", "label_then_image", "audio_then_transcript", "transcript_then_audio", "tokens")
DOCUMENT_DTYPE = np.dtype([("source", "<i2"), ("split", "<i1"), ("layout", "<i1"), ("offset", "<i8"), ("length", "<i4")])
SPLITS = ("train", "val")
WRITTEN = re.compile(r"[\w-]+(\.(train|val))?\.[0-9a-f]{12}\.(bin|npy)")  # the names write_array gives


def write_array(out: Path, stem: str, array: np.ndarray, suffix: Literal["bin", "npy"]) -> str:
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

