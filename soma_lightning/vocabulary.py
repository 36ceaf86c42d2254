"""What a model's token ids mean: the V1 bytes, or the ids of a `tokenizers` JSON file; and their PAD and EOS.

`bytes` (the default) is the V1 byte contract (data_modules/contract.py): ids 0-255 are bytes, PAD is 256 and
EOS 257. A tokenizer file (HF `tokenizers`; read as JSON, so loading it runs no code) gives its own ids: its
`eos_token` ends every document, and PAD is the first id past the tokenizer's, an id the tokenizer never
produces, which the model's vocab_size must hold. The model, the data and generation take PAD and EOS from
here, so the three agree.
"""

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from soma_lightning.errors import UserError

BYTES = "bytes"
BYTE_PAD, BYTE_EOS = 256, 257  # the V1 contract's
DEFAULT_EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class Vocabulary:
    """`tokenizer`: "bytes" or the tokenizer file as named; `size`: the tokenizer emits ids [0, size) (256 for
    bytes: EOS and PAD come after); `sha256`: the tokenizer file's (None for bytes)."""

    tokenizer: str
    size: int
    pad: int
    eos: int
    sha256: str | None = None

    @property
    def is_bytes(self) -> bool:
        return self.tokenizer == BYTES

    @property
    def identity(self) -> tuple[str, int]:
        """What the ids mean, wherever the file lies: ("bytes", EOS) or (the tokenizer file's sha256, EOS)."""
        return self.sha256 or BYTES, self.eos

    def describe(self) -> str:
        """One line naming the vocabulary, for messages."""
        return f"bytes (EOS {self.eos})" if self.is_bytes else f"{self.tokenizer} (sha256 {self.sha256}, EOS {self.eos})"

    def encode(self, text: str | bytes) -> list[int]:
        """A text's ids, without EOS: its UTF-8 bytes, or the tokenizer's ids (bytes decoded as UTF-8, invalid
        sequences replaced)."""
        if self.is_bytes:
            return list(text.encode() if isinstance(text, str) else text)
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return _tokenizer(self.tokenizer, self.sha256).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        """The ids of each text, as `encode` gives them; a tokenizer encodes them on all cores."""
        if self.is_bytes:
            return [self.encode(text) for text in texts]
        texts = [text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text for text in texts]
        return [e.ids for e in _tokenizer(self.tokenizer, self.sha256).encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; EOS, PAD and ids the tokenizer does not have are left out."""
        ids = [i for i in ids if 0 <= i < self.size and i != self.eos]
        if self.is_bytes:
            return bytes(ids).decode("utf-8", errors="replace")
        return _tokenizer(self.tokenizer, self.sha256).decode(ids, skip_special_tokens=False)


BYTE_VOCABULARY = Vocabulary(BYTES, 256, BYTE_PAD, BYTE_EOS)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, sha256: str | None):
    """The tokenizer file, loaded once per (path, content)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def vocabulary(tokenizer: str = BYTES, eos_token: str = DEFAULT_EOS_TOKEN, key: str = "model.arch.tokenizer", error: type[UserError] = UserError) -> Vocabulary:
    """The Vocabulary of `tokenizer` ("bytes" or a tokenizers JSON file) whose `eos_token` ends documents;
    `error` (raised with a message starting with `key`, or with its eos_token sibling: `--eos_token` for
    `--tokenizer`) when the file is missing, unreadable or lacks it."""
    if tokenizer == BYTES:
        return BYTE_VOCABULARY
    path = Path(tokenizer)
    if not path.is_file():
        raise error(f"{key}: {tokenizer!r} is neither `bytes` nor a tokenizers JSON file")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise error(f"{key}: a tokenizer file needs the `tokenizers` package (pip install tokenizers)") from None
    sha256 = file_sha256(path)
    try:
        loaded = _tokenizer(str(path), sha256)
    except Exception as e:
        raise error(f"{key}: cannot read {tokenizer!r} as a tokenizers JSON file ({' '.join(str(e).split())})") from None
    eos = loaded.token_to_id(eos_token)
    if eos is None:
        eos_key = key.removesuffix("tokenizer") + "eos_token"
        raise error(f"{eos_key}: {eos_token!r} is not a token of {tokenizer!r}; name its end-of-document token with {eos_key}")
    size = max(loaded.get_vocab(with_added_tokens=True).values()) + 1
    return Vocabulary(tokenizer, size, pad=size, eos=eos, sha256=sha256)


def check_tokenizer_file(tokenizer: str, sha256: str | None, source: str, flag: str) -> None:
    """A one-line UserError unless `tokenizer` is a file of `sha256`, the SHA-256 of the tokenizer file that
    `source` (a checkpoint) was trained with; nothing to check when it recorded none (bytes). `flag` is how
    to name another file."""
    if sha256 is None:
        return
    found = file_sha256(tokenizer) if tokenizer != BYTES and Path(tokenizer).is_file() else None
    if found != sha256:
        what = "bytes" if tokenizer == BYTES else f"{tokenizer} ({'missing' if found is None else f'sha256 {found}'})"
        raise UserError(f"{flag}: {source} was trained with the tokenizer file of sha256 {sha256}, not {what}; pass that file as {flag}")
