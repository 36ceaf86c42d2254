import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to `<name>.tmp` beside `path`, fsync, then rename over `path`: a failure midway leaves the
    previous file intact, and the tmp is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through `atomic_write`: a crash or interrupt mid-write leaves the previous checkpoint intact.
    (Lightning's own writer stages the file in the system temp directory, and the final move across
    filesystems is a copy, not a rename.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))
