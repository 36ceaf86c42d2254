"""One real training forward and backward of a depth-reduced copy of a design-scale spec on one GPU, against
`soma-lightning inspect`'s memory plan for the same copy; prints a table and writes JSON.

    python bench/design_step.py --config specs/gpt5_moe_design.yaml --layers 1 --seq-len 8192 --out design_step.json
    python bench/design_step.py --config specs/hybrid_235b.yaml --layers 1 --seq-len 8192 --out design_step.json
    python bench/design_step.py --config specs/hybrid_235b.yaml --layers 2 --num-experts 64 --seq-len 8192 --out design_step.json
    python bench/design_step.py --config specs/gpt5_moe_tiny.yaml --layers 2 --seq-len 128 --device cpu   # the harness on a CPU

Planned parameters + gradients + activations at 1 x 8192 tokens in bf16: one gpt5_moe_design layer (23.2 B
parameters with the embeddings and predictor) 111.1 GiB, two with 8 experts 119.6 GiB; one hybrid_235b
superblock (21.0 B) 111.7 GiB, two with 64 experts 103.7 GiB (with 128, 139.7 GiB): one copy at the design's
expert count fits a 141 GB H200, two need fewer experts.

The copy keeps the spec's widths and takes `--layers` layers of its pattern (a gpt5_moe_design layer, a
hybrid_235b superblock); `--num-experts` sets every MoE layer's expert count, for a copy that would not fit
otherwise. The copy is checked on the meta device, then built once on the device with torch's default
dtype set to bfloat16 (`--precision bf16-true`), so its weights are created and initialised there in bf16,
as bf16-true training holds them, with no float32 copy on the device. One batch of 1 x `--seq-len` random
tokens (with the structure a spec's mixers read) runs the training loss without SIGReg, which the plan does
not trace either: cross-entropy, the MTP heads' weighted cross-entropy and the components' auxiliary losses;
then its backward. No optimizer step is taken, so the plan's AdamW line is left out of its total.

Measured: the bytes of the parameters and gradients; activations, the distinct storages autograd saves for
backward (parameters excluded; counted through saved_tensors_hooks); on CUDA, torch.cuda.max_memory_allocated
over the build, forward and backward. Planned: `memory_plan` on a one-GPU mesh, batch 1 x `--seq-len`, the
same precision, no activation checkpointing (its total here: parameters + gradients + activations + weight
copies; the weight copies are zero under bf16-true and 32-true).
"""

import argparse
import copy
import json
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from soma_lightning import load_spec
from soma_lightning.data_modules.structure import batch_structure
from soma_lightning.errors import UserError
from soma_lightning.measure import count_parameters
from soma_lightning.nn.model import SomaModel
from soma_lightning.nn.protocols import auxiliary_terms, reads_structure
from soma_lightning.parallel.memory_plan import memory_plan
from soma_lightning.parallel.mesh import ParallelDims
from soma_lightning.spec import ModelSpec, build_model

DTYPES = {"bf16-true": torch.bfloat16, "32-true": torch.float32}
UNITS = {"GiB": 2**30, "MiB": 2**20}


def reduced_spec(spec: ModelSpec, layers: int, num_experts: int | None) -> ModelSpec:
    """`spec` with `layers` layers and, given `num_experts`, that many experts in every MoE sublayer."""
    blocks = copy.deepcopy(spec.blocks)
    if num_experts is not None:
        moes = [entry["ffn"] for sublayers in blocks.values() for entry in sublayers if isinstance(entry.get("ffn"), dict) and entry["ffn"].get("type") == "moe"]
        if not moes:
            raise UserError("--num-experts: the spec has no MoE sublayer")
        for ffn in moes:
            ffn["num_experts"] = num_experts
    return replace(spec, n_layers=layers, blocks=blocks)


def build(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> SomaModel:
    """The model, its weights created and initialised on `device` in `dtype` (torch's default dtype meanwhile)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build_model(spec, device=device)
    finally:
        torch.set_default_dtype(default)


def training_step(model: SomaModel, tokens: torch.Tensor) -> tuple[float, int]:
    """Forward and backward of SomaLM's training loss less SIGReg on `tokens` [1, T + 1]. Returns (the loss,
    the bytes of the distinct storages autograd saved for backward, parameters excluded)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    structure = batch_structure(inputs.cpu()).to(inputs.device) if reads_structure(model) else None
    params = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Everything saved stays alive until backward, so a storage's address names one storage meanwhile.
        key = StorageWeakRef(t.untyped_storage()).cdata
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        positions = torch.arange(inputs.shape[1], device=inputs.device)[None]
        reps, predictions = model.encode_with_mtp(inputs, positions, None, structure)
        loss = F.cross_entropy(model.predict(reps).flatten(0, 1).float(), targets.flatten())
        for p in predictions:  # horizon k: the target of position t is token t+1+k
            mtp_ce = F.cross_entropy(model.predict(p.representations[:, : -p.horizon]).flatten(0, 1).float(), targets[:, p.horizon :].flatten())
            loss = loss + p.loss_weight * mtp_ce
        for value in auxiliary_terms(model)[0].values():
            loss = loss + value
    activations = sum(saved.values())
    loss.backward()
    return loss.item(), activations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="specs/gpt5_moe_design.yaml")
    p.add_argument("--layers", type=int, default=1, help="layers of the spec's pattern to keep (blocks; hybrid_235b's are superblocks)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--num-experts", type=int, default=None, help="experts in every MoE sublayer (default: the spec's)")
    p.add_argument("--precision", choices=list(DTYPES), default="bf16-true")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a tiny spec, to check the harness")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="design_step.json")
    args = p.parse_args()
    device = torch.device(args.device)
    try:
        full = load_spec(args.config)
        if args.layers < 1:
            raise UserError(f"--layers: must be at least 1, got {args.layers}")
        if not 1 < args.seq_len <= full.max_seq_len:
            raise UserError(f"--seq-len: must be from 2 to the spec's max_seq_len {full.max_seq_len}, got {args.seq_len}")
        spec = reduced_spec(full, args.layers, args.num_experts)
        total, active = count_parameters(build_model(spec, device="meta"))  # validates the copy (e.g. top_k <= num_experts)
    except UserError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    plan = memory_plan(spec, ParallelDims(1, 1, 1, 1), 1, args.seq_len, args.precision, False, device.type)
    planned = {name: plan["bytes"][name] for name in ("parameters", "gradients", "activations", "weight_copies")}
    experts = f", {args.num_experts} experts per MoE layer" if args.num_experts is not None else ""
    print(f"{args.config}: {args.layers} of {full.n_layers} layers{experts}, {total:,} parameters ({active:,} active), "
          f"batch 1 x {args.seq_len}, {args.precision} on {device.type}; forward and backward, no optimizer step", flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = build(spec, device, DTYPES[args.precision])
    built_s = time.perf_counter() - start
    after_build = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    tokens = torch.randint(0, spec.vocab_size, (1, args.seq_len + 1), generator=torch.Generator().manual_seed(args.seed)).to(device)
    start = time.perf_counter()
    loss, activations = training_step(model, tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = time.perf_counter() - start
    measured = {
        "parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None),
        "activations": activations,
        "weight_copies": None,
    }
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    planned_total = sum(planned.values())
    unit = "GiB" if planned_total >= UNITS["GiB"] else "MiB"

    def size(value: float | None) -> str:
        return f"{value / UNITS[unit]:12.2f}" if value is not None else f"{'-':>12}"

    print(f"{unit:28} {'planned':>12} {'measured':>12} {'meas/plan':>10}")
    for name, value in planned.items():
        ratio = f"{measured[name] / value:10.2f}" if measured[name] is not None and value else f"{'':10}"
        print(f"{name:28} {size(value)} {size(measured[name])} {ratio}")
    ratio = f"{peak / planned_total:10.2f}" if peak is not None else f"{'':10}"
    print(f"{'total / peak allocated':28} {size(planned_total)} {size(peak)} {ratio}")
    print(f"{'optimizer (excluded)':28} {size(plan['bytes']['optimizer'])}")
    print(f"peak allocated after the build: {size(after_build).strip()} {unit}; build {built_s:.1f} s, forward and backward {step_s:.1f} s, loss {loss:.4f}")
    json.dump({
        "config": args.config, "layers": args.layers, "num_experts": args.num_experts, "seq_len": args.seq_len, "precision": args.precision,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "parameters": total, "active_parameters": active,
        "planned": planned, "planned_total": planned_total, "planned_optimizer_excluded": plan["bytes"]["optimizer"], "measured": measured,
        "peak_allocated": peak, "peak_allocated_after_build": after_build, "build_s": built_s, "step_s": step_s, "loss": loss,
    }, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
