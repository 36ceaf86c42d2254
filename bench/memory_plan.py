"""`soma-lightning inspect`'s memory plan against the measured peak of real training steps on one GPU; prints
a table and writes JSON.

    python bench/memory_plan.py --out memory_plan.json

Each row trains a spec for `--steps` steps through the Trainer (bf16-mixed, fused AdamW, eager, dropout 0) on
tiny-Shakespeare windows with the spec's data annotations, and reads torch.cuda.max_memory_allocated; the plan is
`memory_plan` for the same batch, sequence length and activation checkpointing on a one-GPU mesh. The plan
sums parameters, gradients, AdamW state, activations and bf16 weight copies as if all were alive at once, so
it is meant to be an upper bound.
"""

import argparse
import gc
import json

import torch

from soma_lightning.data_modules import ByteCorpus
from soma_lightning.lm import SomaLM
from soma_lightning.parallel.memory_plan import memory_plan
from soma_lightning.parallel.mesh import ParallelDims
from soma_lightning.spec import ModelSpec

from compare import one_gpu_trainer, spec_and_data

ROWS = [  # spec, batch size, sequence length, activation checkpointing
    ("specs/soma_v1.yaml", 8, 1024, False),
    ("specs/soma_v1.yaml", 8, 1024, True),
    ("specs/gpt5_moe.yaml", 2, 8192, False),
    ("specs/gpt5_moe.yaml", 2, 8192, True),
    ("specs/sosm.yaml", 8, 1024, False),
    ("specs/hybrid_small.yaml", 4, 4096, False),
]
GIB = 2**30


def measured_peak(spec: ModelSpec, data: ByteCorpus, activation_checkpointing: bool, steps: int) -> float:
    trainer = one_gpu_trainer(steps)
    module = SomaLM(spec, activation_checkpointing=activation_checkpointing)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    peak = torch.cuda.max_memory_allocated()
    del trainer, module
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", default=None, help="comma-separated spec files: only the rows of these")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="memory_plan.json")
    args = p.parse_args()
    rows = [r for r in ROWS if args.specs is None or r[0] in args.specs.split(",")]
    results = []
    print(f"{'spec':26} {'batch x seq':>12} {'ckpt':>5} {'weights+grads+adam':>19} {'activations':>12} {'copies':>7} {'planned':>8} {'measured':>9} {'meas/plan':>10}  (GiB)")
    for config, batch_size, seq_len, checkpointing in rows:
        spec, data = spec_and_data(config, batch_size, seq_len, dropout=0.0)
        plan = memory_plan(spec, ParallelDims(dp_shard=1), batch_size, seq_len, "bf16-mixed", checkpointing, "cuda")["bytes"]
        try:
            peak = measured_peak(spec, data, checkpointing, args.steps)
        except torch.OutOfMemoryError:
            peak = float("nan")
            torch.cuda.empty_cache()
        states = plan["parameters"] + plan["gradients"] + plan["optimizer"]
        results.append({"spec": config, "batch_size": batch_size, "seq_len": seq_len, "activation_checkpointing": checkpointing, "planned": plan, "measured_peak": peak})
        print(
            f"{config:26} {f'{batch_size} x {seq_len}':>12} {'yes' if checkpointing else 'no':>5} {states / GIB:19.2f} {plan['activations'] / GIB:12.2f} "
            f"{plan['weight_copies'] / GIB:7.2f} {plan['total'] / GIB:8.2f} {peak / GIB:9.2f} {peak / plan['total']:10.2f}",
            flush=True,
        )
    json.dump({"device": torch.cuda.get_device_name(), "steps": args.steps, "rows": results}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
