"""FSDP2Strategy: Lightning's ModelParallelStrategy over the `--parallel.*` device mesh (FSDP2, tensor, expert
and context parallel), with atomic sharded checkpoints."""

import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from soma_lightning.parallel.mesh import ParallelDims, batch_rank, build_mesh
from soma_lightning.safe_unpickling import restricted_unpickling


class FSDP2Strategy(ModelParallelStrategy):
    """The device mesh of `dp_shard`, `tp`, `ep` and `cp` (parallel/mesh.py; by default FSDP2 over all ranks),
    which `SomaLM.configure_model` hands to `parallelize` (parallel/parallelize.py). Ranks that share a tp and
    cp coordinate read the same batches. Under context parallel each training step's forward and backward
    run with the batch's sequences split over the cp ranks (`context_parallel_step`).

    A sharded checkpoint is a folder written by every rank (torch.distributed.checkpoint, global shapes): it
    loads into any other mesh. It is written as `NAME.tmp` and swapped in only when complete: at every
    moment `NAME` or `NAME.old` holds a whole checkpoint."""

    def __init__(self, dp_shard: int = -1, tp: int = 1, ep: int = 1, cp: int = 1, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=tp, **kwargs)
        self.parallel = ParallelDims(dp_shard, tp, ep, cp)
        self._context_parallel_step: ExitStack | None = None

    def setup_environment(self) -> None:
        self.parallel = self.parallel.resolved(self.num_nodes * self.num_processes)  # before any process group exists
        self._data_parallel_size, self._tensor_parallel_size = self.parallel.batch_replicas * self.parallel.cp, self.parallel.tp
        self._setup_distributed()
        self._device_mesh = build_mesh(self.parallel, self.root_device.type)
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Batches differ along dp_shard and ep only."""
        return {"num_replicas": self.parallel.batch_replicas, "rank": batch_rank(self.device_mesh)}

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Under context parallel, the step's sequences stay split until its backward has run (`backward`)."""
        if self.parallel.cp > 1:
            from soma_lightning.parallel.parallelize import context_parallel_step

            self._context_parallel_step = ExitStack()
            self._context_parallel_step.enter_context(context_parallel_step(self.device_mesh, args[0]))
        try:
            return super().training_step(*args, **kwargs)
        except BaseException:
            self._end_context_parallel_step()
            raise

    def backward(self, closure_loss: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            return super().backward(closure_loss, *args, **kwargs)
        finally:
            self._end_context_parallel_step()

    def _end_context_parallel_step(self) -> None:
        if self._context_parallel_step is not None:
            self._context_parallel_step.close()
            self._context_parallel_step = None

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
