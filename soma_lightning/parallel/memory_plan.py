"""Per-GPU training memory of a spec on a mesh (`soma-lightning inspect --parallel.* --batch_size N`), without
allocating a weight: parameter, gradient and optimizer bytes from the shapes of a meta-device model, and
activation bytes from one traced training forward on fake tensors (shapes only).

The mesh is parallelize.py's: FSDP2 shards the parameters over dp_shard x ep x cp ranks, each component's
`tensor_parallel_plan` splits it over tp (the MoE experts by hidden unit); with ep > 1 the expert weights
are split over ep instead and kept out of FSDP2; dp_shard x ep ranks each read batch_size sequences, cp
ranks split a sequence's tokens.
"""

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import Shard
from torch.multiprocessing.reductions import StorageWeakRef

from soma_lightning.errors import UserError
from soma_lightning.nn.model import SomaModel
from soma_lightning.nn.moe import MoE
from soma_lightning.nn.protocols import ComponentArgumentError, reads_structure, tensor_parallel_plan
from soma_lightning.parallel.mesh import ParallelDims
from soma_lightning.spec import ModelSpec, build_model

Precision = Literal["32-true", "bf16-mixed", "bf16-true"]
# (bytes of a stored parameter, gradient and AdamW moment; the compute dtype). bf16-mixed keeps float32
# parameters, which are AdamW's master weights, and computes under autocast.
PRECISIONS: dict[str, tuple[int, torch.dtype]] = {"32-true": (4, torch.float32), "bf16-mixed": (4, torch.bfloat16), "bf16-true": (2, torch.bfloat16)}
PROBE_LENGTHS = (64, 128, 192)  # sequence lengths of the traced forwards, for a + b*T + c*T^2 per sequence


def memory_plan(
    spec: ModelSpec, dims: ParallelDims, batch_size: int, seq_len: int, precision: Precision = "bf16-mixed",
    activation_checkpointing: bool = False, device: Literal["cuda", "cpu"] = "cuda",
) -> dict:
    """Bytes per GPU of a training step with AdamW: parameters, gradients, optimizer state, activations saved
    for backward, bf16 weight copies saved for backward (bf16-mixed), FSDP2's unsharded buffers, and their
    sum (an upper bound on the peak: gradients and activations are not all alive at once). `dims` resolved
    (dp_shard >= 1); batch_size sequences of seq_len tokens per data-parallel rank. `device` "cuda" counts
    attention as fused kernels save it (O(T) per sequence), "cpu" with the T x T scores SDPA's math path
    keeps."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if seq_len % dims.cp:
        raise UserError(f"--seq_len: {seq_len} must be a multiple of --parallel.cp {dims.cp}")
    param_bytes, compute_dtype = PRECISIONS[precision]
    model = build_model(spec, device="meta")
    split = _parameter_split(model, spec, dims)
    fsdp = dims.dp_shard * dims.ep * dims.cp
    dense = sum(n / (dims.tp if tp else 1) for n, tp, expert in split.values() if not expert) / fsdp
    experts = sum(n / (dims.tp if tp else 1) for n, tp, expert in split.values() if expert) / dims.ep
    local = dense + experts
    layers, outside = _activations(spec, dims.tp, compute_dtype)
    tokens = batch_size * seq_len / dims.cp
    quadratic = device == "cpu"

    def sequence_bytes(fit: tuple[float, float, float]) -> float:
        # a, what a traced forward saves whatever its length, is the bf16 weight copies: counted below, sharded
        _, b, c = fit
        return batch_size * (b * seq_len / dims.cp + (c * seq_len * seq_len / dims.cp if quadratic else 0.0))

    per_layer = [sequence_bytes(fit) for fit in layers]
    if activation_checkpointing:
        # each block keeps its input, the residual stream in the parameters' dtype; backward recomputes one block at a time
        activations = len(per_layer) * tokens * spec.d_model * param_bytes + max(per_layer) + sequence_bytes(outside)
    else:
        activations = sum(per_layer) + sequence_bytes(outside)
    def matmul(names: list[str]) -> float:
        return sum(split[name][0] / (dims.tp if split[name][1] else 1) / (dims.ep if split[name][2] else 1) for name in names if _is_matmul_weight(model, name))

    names = [name for name, _ in model.named_parameters()]
    if activation_checkpointing:  # the copies of one block, recomputed in backward, and those outside the blocks
        block_names = [[f"encoder.layers.{i}.{name}" for name, _ in layer.named_parameters()] for i, layer in enumerate(model.encoder.layers)]
        inside = {name for block in block_names for name in block}
        copies = max(map(matmul, block_names)) + matmul([name for name in names if name not in inside])
    else:
        copies = matmul(names)
    weight_copies = 2 * copies if precision == "bf16-mixed" else 0
    blocks = [[split[f"encoder.layers.{i}.{name}"] for name, _ in layer.named_parameters()] for i, layer in enumerate(model.encoder.layers)]
    largest = max(sum(n / (dims.tp if tp else 1) for n, tp, expert in block if not expert) for block in blocks)
    fsdp_buffers = 2 * largest * param_bytes if fsdp > 1 else 0  # the block running and the next, prefetched
    plan = {
        "parameters": local * param_bytes,
        "gradients": local * param_bytes,
        "optimizer": 2 * local * param_bytes,  # AdamW's exp_avg and exp_avg_sq, in the parameters' dtype
        "activations": activations,
        "weight_copies": weight_copies,
        "fsdp_buffers": fsdp_buffers,
    }
    return {
        "dims": dataclasses.asdict(dims), "gpus": fsdp * dims.tp, "batch_size": batch_size, "seq_len": seq_len, "precision": precision,
        "activation_checkpointing": activation_checkpointing, "parameters_per_gpu": local, "bytes": plan | {"total": sum(plan.values())},
    }


def _parameter_split(model: SomaModel, spec: ModelSpec, dims: ParallelDims) -> dict[str, tuple[int, bool, bool]]:
    """Parameter name -> (elements, split by tp, expert weight split by ep and kept out of FSDP2). A num_experts
    that ep does not divide, or a tp that a component's plan refuses, is a UserError naming the spec key."""
    from soma_lightning.parallel.parallelize import spec_key

    tp_split: set[str] = set()
    experts: set[str] = set()
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, MoE):
            if module.num_experts % dims.ep:
                raise UserError(f"--parallel.ep {dims.ep}: {spec_key(model, spec, path)}.num_experts: {module.num_experts} experts do not divide among {dims.ep} ranks")
            if dims.ep > 1:
                experts |= {f"{prefix}w_in", f"{prefix}w_out"}
        if dims.tp > 1:
            try:
                plan = tensor_parallel_plan(module, dims.tp)
            except ComponentArgumentError as e:
                raise UserError(f"--parallel.tp {dims.tp}: {spec_key(model, spec, path)}.{e.arg}: {e.reason}") from None
            for name, style in plan.items():
                if name:
                    tp_split |= {f"{prefix}{name}.{p}" for p, _ in module.get_submodule(name).named_parameters()}
                else:  # the component's own parameters that the style shards
                    tp_split |= {f"{prefix}{p}" for p, placement in getattr(style, "placements", {}).items() if isinstance(placement, Shard)}
    return {name: (p.numel(), name in tp_split, name in experts) for name, p in model.named_parameters()}


def _is_matmul_weight(model: nn.Module, name: str) -> bool:
    """Weights that autocast (or the MoE) copies to bf16 for a matrix product: Linear weights and expert weights."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    return (isinstance(module, nn.Linear) and attr == "weight") or (isinstance(module, MoE) and attr in ("w_in", "w_out", "shared_in", "shared_out"))


def _activations(spec: ModelSpec, tp: int, dtype: torch.dtype) -> tuple[list[tuple[float, float, float]], tuple[float, float, float]]:
    """Bytes saved for backward per sequence of T tokens, as a + b*T + c*T^2 fitted to traced forwards at
    PROBE_LENGTHS (one layer of each block of the pattern): per layer of the model, and outside the layers
    (embeddings, sequential MTP, logits and losses)."""
    pattern = spec.pattern if spec.pattern is not None else list(spec.blocks)
    probe = dataclasses.replace(spec, n_layers=min(spec.n_layers, len(pattern)), max_seq_len=max(spec.max_seq_len, *PROBE_LENGTHS))
    traces = [_trace(build_model(probe, device="meta"), t, tp, dtype) for t in PROBE_LENGTHS]
    fits = [_fit([trace[k] for trace in traces]) for k in range(len(traces[0]))]
    layers, outside = fits[:-1], fits[-1]
    return [layers[i % len(layers)] for i in range(spec.n_layers)], outside


def _fit(values: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(PROBE_LENGTHS, dtype=torch.float64)
    a, b, c = torch.linalg.solve(torch.stack([torch.ones_like(t), t, t * t], dim=1), torch.tensor(values, dtype=torch.float64)).tolist()
    return a, b, c


def _trace(model: SomaModel, seq_len: int, tp: int, dtype: torch.dtype) -> list[float]:
    """One training forward of a 1 x seq_len batch on fake tensors: the distinct storages it saves for
    backward (parameters excluded), summed per layer and, last, outside the layers. A sublayer that tensor
    parallelism splits counts 1/tp of its own, but whole those d_model wide (its input and output, the MoE's
    rows to and from the experts: the same on every rank)."""
    from soma_lightning.data_modules.structure import batch_structure

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model = model.to_empty(device="cpu")
    params = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}
    sublayers = {}
    for i, layer in enumerate(model.encoder.layers):
        for norm, name in layer.order:
            for part in (norm, name):
                if part is not None:
                    module = layer.get_submodule(part)
                    sublayers[module] = (i, 1 / tp if tp > 1 and tensor_parallel_plan(module, tp) else 1.0)
    for i, layer in enumerate(model.encoder.layers):
        sublayers.setdefault(layer, (i, 1.0))
    where: list[tuple[int, float]] = [(len(model.encoder.layers), 1.0)]
    def leave(module: nn.Module, args: tuple, output: object) -> None:
        where.pop()

    hooks = [module.register_forward_hook(leave) for module in sublayers]
    hooks += [module.register_forward_pre_hook(lambda m, a, place=place: where.append(place)) for module, place in sublayers.items()]
    totals = [0.0] * (len(model.encoder.layers) + 1)
    seen: dict[int, Tensor] = {}  # holding the tensors: a freed storage's address could come back for another
    d_model = model.predictor.in_features

    def pack(t: Tensor) -> Tensor:
        key = StorageWeakRef(t.untyped_storage()).cdata
        if key not in params and key not in seen:
            seen[key] = t
            index, share = where[-1]
            whole = t.ndim > 0 and t.shape[-1] == d_model
            totals[index] += t.untyped_storage().nbytes() * (1.0 if whole else share)
        return t

    tokens = torch.zeros(1, seq_len, dtype=torch.long)
    structure = batch_structure(tokens) if reads_structure(model) else None
    try:
        with fake, torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inputs = [fake.from_tensor(t) if t is not None else None for t in (tokens, torch.arange(seq_len)[None], None, structure)]
            reps, predictions = model.encode_with_mtp(*inputs)
            targets = fake.from_tensor(tokens)
            F.cross_entropy(model.predict(reps).flatten(0, 1).float(), targets.flatten())
            for p in predictions:
                F.cross_entropy(model.predict(p.representations[:, : -p.horizon]).flatten(0, 1).float(), targets[:, p.horizon :].flatten())
    finally:
        for hook in hooks:
            hook.remove()
    return totals
