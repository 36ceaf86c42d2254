"""`soma-lightning decode`: token ids back to text, PNG and WAV files."""

from json import dumps
from pathlib import Path

import numpy as np

from soma_lightning.data_modules.modalities import decode_to_files
from soma_lightning.data_modules.shards import Shards
from soma_lightning.errors import UserError


def decode(data: str, out: str, tokens: str | None = None, document: int | None = None) -> None:
    """Token ids back to .txt, PNG and WAV files: the text, code, image and audio segments of a token sequence,
    with the tokenizers of a prepared corpus (its index.json and image codebook). Give exactly one of --tokens
    and --document.

    Args:
        data: a directory written by `soma-lightning prepare`
        out: directory for the files
        tokens: ids to decode: a .npy array, or a text file of integers (whitespace or comma separated)
        document: instead: decode document N of the prepared corpus (documents.npy order)
    """
    shards = Shards.open(data, "--data")
    if (tokens is None) == (document is None):
        raise UserError("decode: give exactly one of --tokens FILE and --document N")
    if document is not None:
        n = len(shards.documents())
        if not 0 <= document < n:
            raise UserError(f"--document: {document} is outside the corpus's {n} documents")
        ids = shards.document(document)
    else:
        try:
            ids = np.load(tokens) if tokens.endswith(".npy") else np.array(Path(tokens).read_text().replace(",", " ").split(), dtype=np.int64)
        except (OSError, ValueError) as e:
            raise UserError(f"--tokens: cannot read {tokens} as token ids ({e})") from None
    written = decode_to_files(np.asarray(ids, dtype=np.int64).reshape(-1), shards.space, shards.image, shards.audio, Path(out))
    print(dumps({"tokens": int(np.size(ids)), "files": [str(p) for p in written]}))
