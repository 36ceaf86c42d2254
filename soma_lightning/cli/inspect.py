"""`soma-lightning inspect`: what a spec builds, without building its weights."""

import dataclasses
from json import dumps

from soma_lightning.measure import count_parameters, forward_flops_per_token, train_flops_per_token
from soma_lightning.parallel.mesh import ParallelDims
from soma_lightning.spec import build_model, load_spec


def inspect_spec(config: str) -> dict:
    """Parameters, FLOPs per token and block pattern of the spec in a config file, from a meta-device model
    (no weights allocated)."""
    spec = load_spec(config)
    model = build_model(spec, device="meta")
    total, active = count_parameters(model)

    def describe(block) -> list[str]:
        return [f"{norm or '-'} > {name}:{type(block.get_submodule(name)).__name__}" for norm, name in block.order]

    return {
        "config": config,
        "total_parameters": total,
        "active_parameters": active,
        "seq_len": spec.max_seq_len,
        "forward_flops_per_token": forward_flops_per_token(model, spec.max_seq_len),
        "train_flops_per_token": train_flops_per_token(model, spec.max_seq_len),
        "n_layers": spec.n_layers,
        "d_model": spec.d_model,
        "vocab_size": spec.vocab_size,
        "layers": [describe(layer) for layer in model.encoder.layers],
        "sequential_mtp": [describe(depth.block) for depth in model.mtp.depths] if model.mtp is not None else [],
    }


def inspect(
    config: str, json: bool = False, parallel: ParallelDims = ParallelDims(), batch_size: int | None = None, seq_len: int | None = None,
    precision: str = "bf16-mixed", activation_checkpointing: bool = False,
) -> None:
    """What a spec builds: parameters, FLOPs per token and block pattern, from a meta-device model (no weights
    allocated); with --batch_size or --parallel.*, the memory per GPU of training it on that mesh.

    Args:
        config: a config file with model.arch
        json: print one JSON object instead of a table
        parallel: the mesh of the memory plan (dp_shard -1 reads as 1 here)
        batch_size: sequences per data-parallel rank of the memory plan (default 1)
        seq_len: tokens per sequence of the memory plan (default: the spec's max_seq_len)
        precision: the memory plan's trainer.precision: 32-true, bf16-mixed or bf16-true
        activation_checkpointing: the memory plan with --model.activation_checkpointing true
    """
    info = inspect_spec(config)
    if batch_size is not None or parallel != ParallelDims():
        from soma_lightning.parallel.memory_plan import memory_plan

        dims = dataclasses.replace(parallel, dp_shard=1) if parallel.dp_shard == -1 else parallel
        dims = dims.resolved(dims.dp_shard * dims.ep * dims.cp * dims.tp)
        spec = load_spec(config)
        info["memory_plan"] = memory_plan(spec, dims, batch_size or 1, seq_len or spec.max_seq_len, precision, activation_checkpointing)
    if json:
        print(dumps(info))
        return
    print(f"spec              {info['config']}")
    print(f"parameters        {info['total_parameters']:,} total, {info['active_parameters']:,} active per token")
    print(f"FLOPs per token   {info['forward_flops_per_token'] / 1e9:.4f} GFLOP forward, {info['train_flops_per_token'] / 1e9:.4f} GFLOP train (seq_len {info['seq_len']})")
    print(f"shape             d_model {info['d_model']}, {info['n_layers']} layers, vocab {info['vocab_size']}")
    runs: list[tuple[list[str], int]] = []  # consecutive identical layers, printed as one line
    for layer in info["layers"]:
        if runs and runs[-1][0] == layer:
            runs[-1] = (layer, runs[-1][1] + 1)
        else:
            runs.append((layer, 1))
    start = 0
    for layer, count in runs:
        print(f"layers {start}-{start + count - 1}".ljust(18) + " | ".join(layer))
        start += count
    for k, depth in enumerate(info["sequential_mtp"], start=1):
        print(f"mtp depth {k}".ljust(18) + " | ".join(depth))
    if "memory_plan" in info:
        print_memory_plan(info["memory_plan"])


def print_memory_plan(plan: dict) -> None:
    dims = plan["dims"]
    mesh = " x ".join(f"{name} {dims[name]}" for name in ("dp_shard", "ep", "cp", "tp"))
    print(f"memory per GPU    {plan['gpus']} GPUs ({mesh}), batch {plan['batch_size']} x {plan['seq_len']} tokens per data-parallel rank, "
          f"{plan['precision']}, activation checkpointing {'on' if plan['activation_checkpointing'] else 'off'}")
    for name, value in plan["bytes"].items():
        print(f"  {name:<16}{value / 2**30:>10.2f} GiB" if value >= 2**30 else f"  {name:<16}{value / 2**20:>10.2f} MiB")
