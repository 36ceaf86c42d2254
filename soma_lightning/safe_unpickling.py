"""Unpickling without running code, for torch.distributed.checkpoint folders a user hands us.

torch.distributed.checkpoint unpickles a folder's `.metadata` with plain `pickle` and its non-tensor items
with `torch.load(weights_only=False)`: a crafted folder runs code when it is read. `restricted_unpickling()`
replaces both, for every reader in this process while it is active, with unpicklers that build only the
checkpoint metadata classes and plain data. torch's own weights-only unpickler cannot read `.metadata`: it
rejects the FRAME opcode of pickle protocol 4, which DCP writes; so `.metadata` goes through Python's
documented way of restricting globals instead.
"""

import io
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner


# Every global that torch.distributed.checkpoint's `.metadata` refers to; nothing else may be built.
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Python's documented way to restrict unpickling: `find_class` resolves only allow-listed globals (and
    torch dtypes); any other global - os.system, builtins.eval, ... - is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


class _RestrictedPickle:
    """Stands in for the `pickle` module inside torch.distributed.checkpoint.filesystem: writing is
    unchanged, reading goes through MetadataUnpickler."""

    dump = staticmethod(pickle.dump)
    dumps = staticmethod(pickle.dumps)

    @staticmethod
    def load(file: io.BufferedIOBase) -> Any:
        return MetadataUnpickler(file).load()


def _load_bytes_weights_only(self: DefaultLoadPlanner, read_item: Any, value: io.BytesIO) -> None:
    """DefaultLoadPlanner.load_bytes with `weights_only=True` (optimizer hyper-parameters and step counts
    are plain data)."""
    loaded = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
    else:
        self.state_dict[read_item.dest_index.fqn] = loaded


@contextmanager
def restricted_unpickling() -> Iterator[None]:
    """While active, torch.distributed.checkpoint reads `.metadata` and non-tensor items without running
    code (see the module docstring). Re-entrant."""
    saved = dcp_filesystem.pickle, DefaultLoadPlanner.load_bytes
    dcp_filesystem.pickle, DefaultLoadPlanner.load_bytes = _RestrictedPickle, _load_bytes_weights_only
    try:
        yield
    finally:
        dcp_filesystem.pickle, DefaultLoadPlanner.load_bytes = saved
