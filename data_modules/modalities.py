"""One token space for text, code, images and audio: the marker tokens that frame each modality in a document,
prompts, and token sequences decoded back to files. The image and audio tokenizers are in tokenizers.py."""

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.data_modules.contract import EOS, PAD
from soma_lightning.errors import SpecError, UserError

if TYPE_CHECKING:
    from soma_lightning.data_modules.tokenizers import AudioTokenizer, ImageTokenizer

# The marker tokens, in the order they take the first ids of the `markers` range: the one place they are defined.
MARKERS = ("begin_text", "end_text", "begin_code", "end_code", "begin_image", "end_image", "image_row", "begin_audio", "end_audio")


class BadInput(UserError):
    """An input file that cannot be tokenised (unreadable image, corrupt WAV, an id outside the token space);
    the message starts with the file name."""


class TokenSpace:
    """Where each modality's ids live, read from model.arch.vocab_ranges: `bytes` (text; PAD 256 and EOS 257
    must lie in a declared range, e.g. `specials`), `markers` (MARKERS in order), and where the corpus needs
    them `image`, `audio` and optionally `code` (code bytes offset into it; without it code uses byte ids)."""

    def __init__(self, ranges: dict[str, list[int]] | None) -> None:
        if not ranges:
            raise SpecError("model.arch.vocab_ranges: a multimodal corpus needs the token space declared (bytes, markers, image, audio, ...)")
        self.ranges = {name: (int(s), int(e)) for name, (s, e) in ranges.items()}
        self.need("bytes", 256, "text bytes")
        self.need("markers", len(MARKERS), "the markers " + ", ".join(MARKERS))
        for special in (PAD, EOS):
            if not any(s <= special < e for s, e in self.ranges.values()):
                raise SpecError(f"model.arch.vocab_ranges: PAD {PAD} and EOS {EOS} must lie in a declared range (e.g. specials: [256, 264])")
        if self.ranges["bytes"][0] != 0:
            raise SpecError(f"model.arch.vocab_ranges.bytes: must start at 0 (byte ids are the V1 contract's), got {list(self.ranges['bytes'])}")

    def need(self, name: str, size: int, what: str) -> None:
        if name not in self.ranges:
            raise SpecError(f"model.arch.vocab_ranges.{name}: not declared; {what} need a range of at least {size} ids")
        s, e = self.ranges[name]
        if e - s < size:
            raise SpecError(f"model.arch.vocab_ranges.{name}: [{s}, {e}) holds {e - s} ids; {what} need {size}")

    def start(self, name: str) -> int:
        return self.ranges[name][0]

    def marker(self, name: str) -> int:
        return self.start("markers") + MARKERS.index(name)

    def code_offset(self) -> int:
        """Code bytes are byte + code_offset(): into the `code` range when declared, else plain byte ids."""
        return self.start("code") if "code" in self.ranges else 0

    def outside(self, tokens: np.ndarray) -> int | None:
        """The index of the first id outside every declared range, or None."""
        inside = np.zeros(tokens.shape, dtype=bool)
        for s, e in self.ranges.values():
            inside |= (tokens >= s) & (tokens < e)
        bad = np.flatnonzero(~inside)
        return int(bad[0]) if len(bad) else None


# ---------------------------------------------------------------- documents


SEGMENTS = {"text": ("begin_text", "end_text"), "code": ("begin_code", "end_code"), "image": ("begin_image", "end_image"), "audio": ("begin_audio", "end_audio")}


def framed(space: TokenSpace, kind: str, body: np.ndarray) -> np.ndarray:
    """A modality's ids between its begin and end markers."""
    begin, end = SEGMENTS[kind]
    return np.concatenate([[space.marker(begin)], body, [space.marker(end)]]).astype(np.int64)


def text_ids(text: str | bytes) -> np.ndarray:
    return np.frombuffer(text.encode() if isinstance(text, str) else text, dtype=np.uint8).astype(np.int64)


def prompt(space: TokenSpace, text: str, kind: Literal["image", "audio"]) -> np.ndarray:
    """The ids that ask a model trained on text-first documents for an image or clip of `text` (a label or a
    transcript): the framed text, then the modality's begin marker."""
    return np.concatenate([framed(space, "text", text_ids(text)), [space.marker(SEGMENTS[kind][0])]])


def segments(tokens: np.ndarray, space: TokenSpace) -> list[tuple[str, np.ndarray]]:
    """Split a token sequence into (kind, body) pieces at the begin markers; a piece ends at its end marker,
    the next begin marker, EOS or the end of the sequence (so a generation cut short still decodes)."""
    begins = {space.marker(b): kind for kind, (b, _) in SEGMENTS.items()}
    ends = {space.marker(e) for _, e in SEGMENTS.values()} | {EOS, PAD}
    out, kind, body = [], None, []
    for t in tokens.tolist() + [EOS]:
        if kind is not None and (t in ends or t in begins):
            out.append((kind, np.array(body, dtype=np.int64)))
            kind = None
        if t in begins:
            kind, body = begins[t], []
        elif kind is not None:
            body.append(t)
    return out


def decode_to_files(tokens: np.ndarray, space: TokenSpace, image: "ImageTokenizer | None", audio: "AudioTokenizer | None", out: Path) -> list[Path]:
    """Write each segment of a token sequence to `out`: NN_text.txt / NN_code.txt (utf-8, invalid bytes
    replaced), NN_image.png, NN_audio.wav. Returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (kind, body) in enumerate(segments(tokens, space)):
        if kind in ("text", "code"):
            offset = space.code_offset() if kind == "code" else 0
            data = bytes((body[(body >= offset) & (body < offset + 256)] - offset).astype(np.uint8))
            path = out / f"{i:02d}_{kind}.txt"
            atomic_write(path, lambda tmp: tmp.write_text(data.decode(errors="replace")))
        elif kind == "image":
            if image is None:
                raise UserError("decode: the sequence holds an image but the corpus has no image tokenizer")
            path = out / f"{i:02d}_image.png"
            image.save_png(body, path)
        else:
            if audio is None:
                raise UserError("decode: the sequence holds audio but the corpus has no audio tokenizer")
            path = out / f"{i:02d}_audio.wav"
            audio.save_wav(body, path)
        written.append(path)
    return written
