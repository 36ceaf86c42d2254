"""`soma-lightning score`: the on-chain loss of canonical V1 weights, as the network's scorer computes it."""

import sys
from dataclasses import asdict
from json import dumps
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from soma_lightning.checkpoint_io import describe_write_error
from soma_lightning.data_modules.byte_corpus import source_files
from soma_lightning.errors import UserError
from soma_lightning.onchain import V1_BATCH_SIZE, describe_scoring
from soma_lightning.onchain import score as score_weights
from soma_lightning.v1 import V1_NUM_HEADS, check_device, file_num_heads, file_size, model_from_canonical, resolve_num_heads, size_mismatch


def read_data(path: str) -> bytes:
    """The bytes of a file, or of every file of a directory (sorted by path) concatenated; none is an error."""
    data = b"".join(f.read_bytes() for f in source_files(path, "--data"))
    if not data:
        raise UserError(f"--data: no data to score (0 bytes in {path}); the canonical scorer fails with EmptyData")
    return data


def score(
    weights: str,
    data: str,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = V1_BATCH_SIZE,
    num_heads: int | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    attention: Literal["reference", "sdpa"] = "reference",
    embedding_out: str | None = None,
    strict_v1: bool = False,
    progress: bool | None = None,
) -> None:
    """The on-chain loss of canonical V1 weights on data, as the network's Rust scorer computes it; prints it
    as JSON.

    Args:
        weights: canonical V1 safetensors; dimensions are read from its shapes
        data: a file, or a directory whose files are concatenated in path order
        seed: noise seed; batch b uses seed + b
        device: cpu, cuda or cuda:N
        batch_size: rows per batch
        num_heads: attention heads (shapes cannot tell); default: the count an export records in its
            metadata, else V1's 8
        dtype: bfloat16: autocast
        attention: reference: plain softmax, the reference's arithmetic; sdpa: fused kernels
        embedding_out: save the embedding vector here (.npy)
        strict_v1: refuse weights that are not the registered V1 size (default: a warning)
        progress: a progress bar on stderr; default: when stderr is a terminal
    """
    if batch_size <= 0:
        raise UserError(f"--batch_size: expected a positive number of sequences per batch, got {batch_size}")
    target = check_device(device)
    if embedding_out:
        out = Path(embedding_out)
        if out.is_dir():
            raise UserError(f"--embedding_out: {out} is a directory; expected the path of a .npy file")
        if not out.parent.is_dir():
            raise UserError(f"--embedding_out: the folder {out.parent} does not exist; create it first")
    if num_heads is None and file_num_heads(weights) is None:
        print(f"soma-lightning: {weights} does not record its head count; assuming V1's {V1_NUM_HEADS} (--num_heads sets it)", file=sys.stderr)
    num_heads = resolve_num_heads(weights, num_heads)
    if mismatch := size_mismatch(file_size(weights, num_heads)):
        if strict_v1:
            raise UserError(f"--strict_v1: {weights} is {mismatch}")
        print(f"soma-lightning: warning: {weights} is {mismatch}; scoring it anyway (--strict_v1 refuses)", file=sys.stderr)
    text = read_data(data)
    print(f"soma-lightning: {describe_scoring(len(text), batch_size)}", file=sys.stderr)
    model = model_from_canonical(weights, num_heads, str(target), attention)
    result, embedding = score_weights(
        model, text, seed, batch_size, autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    if embedding_out:
        try:
            np.save(embedding_out, embedding.numpy())
        except OSError as e:
            raise UserError(f"--embedding_out: {describe_write_error(embedding_out, e) or e}") from None
    print(dumps(asdict(result)))
