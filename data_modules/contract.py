"""The SOMA V1 byte data contract (contract section 3): bytes -> fixed-length token/target/position rows."""

import torch
from torch import Tensor

from soma_lightning.vocabulary import BYTE_EOS, BYTE_PAD

PAD = BYTE_PAD
EOS = BYTE_EOS


def tokenize(data: bytes | Tensor, max_seq_len: int = 1024, pad: int = PAD, eos: int = EOS) -> dict[str, Tensor]:
    """Non-overlapping chunks of `max_seq_len`. EOS only after the last byte of the last chunk and only if it
    has room; the rest PAD. Targets are the tokens shifted left with PAD appended; positions are global byte
    offsets, EOS/PAD clamped to one past the chunk's last byte. Returns int64 tensors [num_chunks, S]
    (num_chunks = 0 for empty data). `data` may be bytes or a 1-D tensor of token ids; `pad` and `eos` are
    the V1 contract's unless the ids are a tokenizer's (vocabulary.py)."""
    ids = torch.tensor(list(data), dtype=torch.long) if isinstance(data, (bytes, bytearray)) else data.long()
    n, s = ids.numel(), max_seq_len
    chunks = -(-n // s)
    tokens = torch.full((chunks * s,), pad, dtype=torch.long)
    tokens[:n] = ids
    if n % s:
        tokens[n] = eos
    tokens = tokens.view(chunks, s)
    offsets = torch.arange(chunks).unsqueeze(1) * s
    data_len = (n - offsets).clamp(max=s)
    index = torch.arange(s).unsqueeze(0)
    positions = offsets + torch.minimum(index, data_len)
    targets = torch.cat([tokens[:, 1:], torch.full((chunks, 1), pad, dtype=torch.long)], dim=1)
    return {"tokens": tokens, "targets": targets, "positions": positions}
