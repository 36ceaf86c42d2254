"""The device mesh from the `--parallel.*` flags: data-parallel sharding (FSDP2), expert, context and tensor
parallel degrees whose product is the world size.

The mesh's dimensions, outermost first, are ("dp_shard", "ep", "cp", "tp"): tensor-parallel ranks are
neighbours (one node's fast links carry their per-layer collectives). Ranks that differ in dp_shard or ep
read different batches; cp ranks read one batch and split its sequence; tp ranks read the same tokens.
FSDP2 shards the dense parameters over every rank of one tp coordinate (dp_shard x ep x cp).
"""

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from soma_lightning.errors import UserError

MESH_DIMS = ("dp_shard", "ep", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism; dp_shard -1 takes what the others leave of the world size.

    Args:
        dp_shard: ranks FSDP2 shards parameters over, each reading its own batches (-1: world size / (ep x cp x tp)).
        tp: tensor parallel: the components' heads and hidden units split over this many ranks.
        ep: expert parallel: each MoE layer's experts split over this many ranks, which read different batches.
        cp: context parallel: each sequence split over this many ranks (CUDA, SDPA causal attention only).
    """

    dp_shard: int = -1
    tp: int = 1
    ep: int = 1
    cp: int = 1

    def resolved(self, world_size: int) -> "ParallelDims":
        """These degrees with dp_shard filled in; a UserError naming the flags unless their product is `world_size`."""
        for name in ("tp", "ep", "cp"):
            if getattr(self, name) < 1:
                raise UserError(f"--parallel.{name}: must be at least 1, got {getattr(self, name)}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise UserError(f"--parallel.dp_shard: must be at least 1, or -1 for the rest of the world size, got {self.dp_shard}")
        others = self.tp * self.ep * self.cp
        flags = f"--parallel.ep {self.ep} x --parallel.cp {self.cp} x --parallel.tp {self.tp}"
        world = f"the world size {world_size} (trainer.devices x trainer.num_nodes)"
        if self.dp_shard == -1:
            if world_size % others:
                raise UserError(f"{flags} = {others} does not divide {world}, so --parallel.dp_shard -1 cannot take the rest")
            return ParallelDims(world_size // others, self.tp, self.ep, self.cp)
        if self.dp_shard * others != world_size:
            raise UserError(f"--parallel.dp_shard {self.dp_shard} x {flags} = {self.dp_shard * others} must equal {world}")
        return self

    @property
    def batch_replicas(self) -> int:
        """Ranks that read different batches: dp_shard x ep."""
        return self.dp_shard * self.ep


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The 4-D mesh of resolved `dims` over the initialised process group, dimensions named MESH_DIMS."""
    return init_device_mesh(device_type, tuple(getattr(dims, name) for name in MESH_DIMS), mesh_dim_names=MESH_DIMS)


def mesh_dims(mesh: DeviceMesh) -> ParallelDims:
    """The degrees of a mesh `build_mesh` made."""
    if mesh.mesh_dim_names != MESH_DIMS:
        raise UserError(
            f"trainer.strategy: soma-lightning parallelizes over the mesh of soma_lightning.strategies.FSDP2Strategy, dimensions "
            f"{MESH_DIMS}; got one with {mesh.mesh_dim_names}"
        )
    return ParallelDims(**{name: mesh[name].size() for name in MESH_DIMS})


def submesh(mesh: DeviceMesh, names: tuple[str, ...]) -> DeviceMesh:
    """The ranks of `mesh` that differ only in the dimensions `names`, as one dimension (flattened where more
    than one of them has more than one rank)."""
    wide = tuple(name for name in names if mesh[name].size() > 1) or names[:1]
    return mesh[wide[0]] if len(wide) == 1 else mesh[wide]._flatten("_".join(wide))


def batch_rank(mesh: DeviceMesh) -> int:
    """This rank's index among the ranks that read different batches (dp_shard x ep); tp and cp ranks share it."""
    coordinate = mesh.get_coordinate()
    return coordinate[0] * mesh["ep"].size() + coordinate[1]


def batch_replica(strategy: object, global_rank: int, world_size: int) -> tuple[int, int]:
    """(index, count) of this rank among the ranks that read different batches, by a Lightning strategy's
    distributed sampler arguments: under tensor or context parallel fewer than the world size; else
    (`global_rank`, `world_size`)."""
    kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
    return kwargs.get("rank", global_rank), kwargs.get("num_replicas", world_size)
