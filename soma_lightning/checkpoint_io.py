import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from soma_lightning.errors import UserError


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


_WRITE_ERRORS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def describe_write_error(path: str | os.PathLike, error: BaseException) -> str | None:
    """'cannot write PATH: <reason>' for an error that writing PATH raised: an OSError, or a native writer's
    error whose text carries the errno as "(os error N)" (safetensors' SafetensorError); None for any other
    error."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None and (match := re.search(r"\(os error (\d+)\)", str(error))):
        code = int(match[1])
    if code is None:
        return None
    return f"cannot write {path}: {_WRITE_ERRORS.get(code) or os.strerror(code)}"


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # POSIX can only read the umask by setting it; restored at once
    os.umask(mask)
    return mask


def ordinary_mode(path: str | os.PathLike) -> None:
    """Give a file the mode open() would have created it with (0666 less the umask): writers that go through
    a private temp file (safetensors' save_file) leave 0600."""
    os.chmod(path, 0o666 & ~_umask())


def _torch_save(checkpoint: dict[str, Any], path: Path) -> None:
    # Through a Python file, so that a full disk raises OSError(ENOSPC), not the zip writer's RuntimeError.
    with open(path, "wb") as f:
        torch.save(checkpoint, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through `atomic_write`: a crash or interrupt mid-write leaves the previous checkpoint intact.
    (Lightning's own writer stages the file in the system temp directory, and the final move across
    filesystems is a copy, not a rename.) A write that fails for lack of space or permission ends the run
    with one line saying so."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        try:
            atomic_write(Path(path), lambda tmp: _torch_save(checkpoint, tmp))
        except OSError as e:
            reason = describe_write_error(path, e)
            if reason is None:
                raise
            raise UserError(f"{reason}; the previous checkpoint there, if any, is unchanged") from None
