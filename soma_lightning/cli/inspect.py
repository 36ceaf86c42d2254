"""`soma-lightning inspect`: what a spec builds, without building its weights."""

from json import dumps

from soma_lightning.measure import count_parameters, forward_flops_per_token, train_flops_per_token
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


def inspect(config: str, json: bool = False) -> None:
    """What a spec builds: parameters, FLOPs per token and block pattern, from a meta-device model (no weights
    allocated).

    Args:
        config: a config file with model.arch
        json: print one JSON object instead of a table
    """
    info = inspect_spec(config)
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
