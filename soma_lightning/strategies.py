"""FSDP2Strategy: Lightning's ModelParallelStrategy as pure data parallelism, with atomic sharded checkpoints."""

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from soma_lightning.safe_unpickling import restricted_unpickling


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all ranks: the device mesh is (data_parallel = world size, tensor_parallel = 1), and
    `SomaLM.configure_model` shards one unit per block. ModelParallelStrategy's "auto" sizes would make
    the data-parallel group one rank per node, so the sizes are fixed here once the world size is known.

    A sharded checkpoint is a folder written by every rank. It is written as `NAME.tmp` and swapped in
    only when complete: at every moment `NAME` or `NAME.old` holds a whole checkpoint."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, with the folder's DCP metadata read without running code (safe_unpickling.py)."""
        with restricted_unpickling():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, path, storage_options)
        partial, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        if self.global_rank == 0 and partial.exists():
            shutil.rmtree(partial)  # left by a save that was interrupted
        self.barrier("fsdp2_checkpoint_clean")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("fsdp2_checkpoint_written")
        if self.global_rank == 0:
            if path.exists():
                path.rename(old)
            partial.rename(path)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        self.barrier("fsdp2_checkpoint_swapped")
