"""`parallelize`: every parallelism and per-block transform of a SomaModel, applied from outside the model
code in one place and a fixed order (torchtitan's parallelize.py):

1. float8 Linear layers in the blocks (torchao);
2. tensor parallel: each component's `tensor_parallel_plan` (nn/protocols.py) over the mesh's tp ranks;
3. expert parallel: the MoE experts over the ep ranks (parallel/expert_parallel.py);
4. context parallel: nothing to the model (checked first, `check_context_parallel`); the strategy splits
   each training step's sequences (`context_parallel_step`);
5. activation checkpointing per block;
6. torch.compile per block;
7. FSDP2: one fully_shard unit per block, then the root.

Without a mesh (one device, DDP, DeepSpeed) only 1, 5 and 6 apply. What a mesh cannot take is refused
before anything is sharded.
"""

from contextlib import contextmanager
from typing import Iterator

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

from soma_lightning.errors import UserError
from soma_lightning.float8 import convert_blocks_to_float8
from soma_lightning.nn.attention import MultiHeadAttention
from soma_lightning.nn.ffn import GeluMLP
from soma_lightning.nn.gqa import GroupedQueryAttention
from soma_lightning.nn.model import Block, SomaModel
from soma_lightning.nn.moe import MoE
from soma_lightning.nn.protocols import ComponentArgumentError, tensor_parallel_plan
from soma_lightning.parallel.mesh import ParallelDims, mesh_dims, submesh
from soma_lightning.spec import ModelSpec

FSDP_FORWARD_METHODS = ("encode", "encode_with_mtp", "predict")  # SomaLM calls these, not forward


def parallelize(
    model: SomaModel, mesh: DeviceMesh | None, spec: ModelSpec, *, float8: bool = False, activation_checkpointing: bool = False,
    compile: bool = False,
) -> None:
    """Apply, in place and in the module docstring's order, what `mesh` (FSDP2Strategy's, or None) and the
    flags ask for. `spec` is the model's spec, for errors that name its keys."""
    dims = mesh_dims(mesh) if mesh is not None else ParallelDims(1, 1, 1, 1)
    if float8 and dims.tp > 1:
        raise UserError(f"model.float8: not with tensor parallelism (--parallel.tp {dims.tp}); use one or the other")
    if dims.cp > 1:
        check_context_parallel(model, spec)
    if float8:
        convert_blocks_to_float8(model)
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], spec)
    if dims.ep > 1:
        from soma_lightning.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, mesh["ep"], mesh["ep", "tp"] if dims.tp > 1 else None)
    model.encoder.activation_checkpointing = activation_checkpointing
    if compile:
        # Under tensor parallel each input shape (training, validation) gets its own static graph: tracing
        # the backward of DTensor layers with dynamic shapes, as a recompile for a second shape would, fails
        # in torch's AOTAutograd (RecursionError in proxy_tensor.get_proxy_slot, torch 2.13).
        for layer in model.encoder.layers:
            layer.compile(dynamic=False if dims.tp > 1 else None)
    if mesh is not None:
        apply_fsdp(model, mesh)


def apply_tensor_parallel(model: SomaModel, tp_mesh: DeviceMesh, spec: ModelSpec) -> None:
    """Every component's plan over `tp_mesh`; a tp its plan refuses is a UserError naming the spec key."""
    tp = tp_mesh.size()
    plans = {}
    for path, module in model.named_modules():  # every plan first: a refusal leaves the model untouched
        try:
            plans[path] = (module, tensor_parallel_plan(module, tp))
        except ComponentArgumentError as e:
            raise UserError(f"--parallel.tp {tp}: {spec_key(model, spec, path)}.{e.arg}: {e.reason}") from None
    for module, plan in plans.values():
        for name, style in plan.items():
            parallelize_module(module.get_submodule(name), tp_mesh, style)
    sublayers = [plans[f"{path}.{name}"] for path, m in model.named_modules() if isinstance(m, Block) for _, name in m.order]
    whole = sorted({type(module).__name__ for module, plan in sublayers if not plan})
    rank_zero_info(
        f"soma-lightning: tensor parallel over {tp} ranks: {sum(bool(plan) for _, plan in sublayers)} of {len(sublayers)} block "
        f"components sharded" + (f"; run whole on every rank: {', '.join(whole)}" if whole else "")
    )


def spec_key(model: SomaModel, spec: ModelSpec, path: str) -> str:
    """The spec key of the component at module path `path` (a block's sublayer), e.g. model.arch.blocks.layer[0].mixer."""
    parts = path.split(".")
    block_name = None
    if parts[:2] == ["encoder", "layers"] and len(parts) == 4:
        pattern = spec.pattern if spec.pattern is not None else list(spec.blocks)
        block_name, block = pattern[int(parts[2]) % len(pattern)], model.encoder.layers[int(parts[2])]
    elif parts[:2] == ["mtp", "depths"] and len(parts) == 5 and spec.mtp is not None:
        block_name, block = spec.mtp["block"], model.mtp.depths[int(parts[2])].block
    if block_name is None:
        return f"model.arch ({path})"
    k = [name for _, name in block.order].index(parts[-1])
    kind = next(kind for kind in ("mixer", "ffn", "mtp") if kind in spec.blocks[block_name][k])
    return f"model.arch.blocks.{block_name}[{k}].{kind}"


def apply_fsdp(model: SomaModel, mesh: DeviceMesh) -> None:
    """FSDP2 over the ranks of one tp coordinate: one unit per block, then the root. Experts that expert
    parallelism sharded (DTensors on the ep mesh, or the (ep, tp) mesh) stay out of FSDP2; their gradients
    are averaged over the ranks that hold the same experts (dp_shard x cp), where there are several."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    experts = {p for p in model.parameters() if isinstance(p, DTensor) and "ep" in (p.device_mesh.mesh_dim_names or ())}
    if experts:
        _average_gradients(experts, submesh(mesh, ("dp_shard", "cp")))
    data = submesh(mesh, ("dp_shard", "ep", "cp"))
    for layer in model.encoder.layers:
        fully_shard(layer, mesh=data, ignored_params=experts or None)
    fully_shard(model, mesh=data, ignored_params=experts or None)
    for method in FSDP_FORWARD_METHODS:
        register_fsdp_forward_method(model, method)


def _average_gradients(params: set[nn.Parameter], mesh: DeviceMesh) -> None:
    """After each backward, each of `params`' local gradient becomes its mean over `mesh` (nothing for one rank)."""
    if mesh.size() == 1:
        return
    group, n = mesh.get_group(), mesh.size()

    def average(param: nn.Parameter) -> None:
        grad = param.grad.to_local()
        torch.distributed.all_reduce(grad, group=group)
        grad.div_(n)

    for param in params:
        param.register_post_accumulate_grad_hook(average)


# Components whose function over a sequence split into chunks is ring attention's: attention that is SDPA's
# causal kernel, and position-wise layers.
CONTEXT_PARALLEL_COMPONENTS = (MultiHeadAttention, GroupedQueryAttention, GeluMLP, MoE)


def check_context_parallel(model: SomaModel, spec: ModelSpec) -> None:
    """A UserError naming the first spec key that context parallelism cannot split: ring attention
    (torch.distributed.tensor.experimental.context_parallel) replaces SDPA's causal kernels only, so every
    mixer must be causal SDPA attention over the whole window (no window, structural bias or other mixers),
    and nothing may read tokens across a chunk's edge (input n-gram embeddings, MTP heads)."""
    if spec.input_embeddings:
        raise UserError("model.arch.input_embeddings: context parallel (--parallel.cp) splits the sequence; n-gram embeddings read across chunks")
    if spec.mtp is not None:
        raise UserError("model.arch.mtp: context parallel (--parallel.cp) does not support multi-token prediction")
    if spec.token_embedding is not None:
        raise UserError("model.arch.token_embedding: context parallel (--parallel.cp) supports the plain token table only")
    for path, block in model.named_modules():
        if not isinstance(block, Block):
            continue
        for _, name in block.order:
            module, where = block.get_submodule(name), f"{path}.{name}"
            if not isinstance(module, CONTEXT_PARALLEL_COMPONENTS):
                raise UserError(f"{spec_key(model, spec, where)}: context parallel (--parallel.cp) does not support {type(module).__name__}")
            if isinstance(module, MultiHeadAttention) and module.impl != "sdpa":
                raise UserError(f"{spec_key(model, spec, where)}.impl: context parallel (--parallel.cp) needs 'sdpa', got {module.impl!r}")
            if isinstance(module, GroupedQueryAttention):
                for arg in ("window", "structure_bias"):
                    if getattr(module, arg) is not None:
                        key = "structure_buckets" if arg == "structure_bias" else arg
                        raise UserError(f"{spec_key(model, spec, where)}.{key}: context parallel (--parallel.cp) supports causal attention over the whole window only")
                if module.impl not in ("auto", "sdpa"):
                    raise UserError(f"{spec_key(model, spec, where)}.impl: context parallel (--parallel.cp) needs 'auto' or 'sdpa', got {module.impl!r}")


CONTEXT_PARALLEL_KEYS = ("tokens", "positions", "targets")


@contextmanager
def context_parallel_step(mesh: DeviceMesh, batch: dict[str, torch.Tensor]) -> Iterator[None]:
    """For the duration (a training step's forward and backward), `batch`'s tokens, positions and targets
    hold this rank's chunks of the sequence (in place; torch's load balancing gives each rank chunks from the
    start and the end, so causal work is even) and SDPA runs as ring attention over the cp ranks. Batches
    with document ids or structure are refused: ring attention has the causal mask only."""
    from torch.distributed.tensor.experimental import context_parallel

    for key in ("doc_ids", "structure"):
        if batch.get(key) is not None:
            raise UserError(f"data.init_args.{key}: context parallel (--parallel.cp) has the causal mask only; set {key}: false")
    cp = mesh["cp"].size()
    length = batch["tokens"].shape[1]
    if length % (2 * cp):
        raise UserError(f"data.init_args.seq_len: {length} must be a multiple of 2 x --parallel.cp = {2 * cp}")
    buffers = [batch[key] for key in CONTEXT_PARALLEL_KEYS]
    with context_parallel(mesh["cp"], buffers=buffers, buffer_seq_dims=[1] * len(buffers), no_restore_buffers=set(buffers)):
        yield


def spans_meshes(params: list[nn.Parameter]) -> bool:
    """Whether the gradients of `params` are DTensors of more than one mesh or layout (tensor or expert
    parallel beside FSDP2), which torch's clip_grad_norm_ cannot stack into one norm."""
    specs = {(g.device_mesh, g.placements) if isinstance(g, DTensor) else None for g in (p.grad for p in params) if g is not None}
    return len(specs) > 1


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (L2, in place) over gradients of any meshes: the squared norms are summed per
    mesh and layout, each group made whole with one collective; every shard is scaled by the same factor.
    Returns the total norm."""
    groups: dict[object, list[torch.Tensor]] = {}
    for g in (p.grad for p in params if p.grad is not None):
        groups.setdefault((g.device_mesh, g.placements) if isinstance(g, DTensor) else None, []).append(g)
    total = torch.zeros((), device=params[0].device if params else "cpu")
    for grads in groups.values():
        squares = torch.stack([g.float().square().sum() for g in grads]).sum()
        total = total + (squares.full_tensor() if isinstance(squares, DTensor) else squares)
    total = total.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grads in groups.values():
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], scale)
    return total
