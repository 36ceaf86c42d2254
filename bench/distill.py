"""Distillation at small size, on CPU: a student distilled from a stronger teacher against the same student
trained alone for the same steps (same seed, same batches), on the tiny Shakespeare text shipped in the package.

1. teacher: specs/quickstart.yaml's model (d_model 128, 4 layers, 0.86 M parameters), --teacher_steps steps;
2. student alone: V1's shape at d_model 64, 2 layers, hidden 256 (0.13 M parameters), --steps steps;
3. student distilled: the same, plus model.distill from the teacher's last.ckpt, for each WEIGHT:TEMPERATURE
   of --distill.

    python bench/distill.py --out distill.json [--steps 500] [--teacher_steps 1000] [--distill 0.5:2,1:1]

Prints the final val bits/byte of each run (all on the same val split) and writes JSON; runs log under --runs.
On a busy machine, OMP_NUM_THREADS=1 is several times faster than torch's threads contending for the cores.
"""

import argparse
import json
from pathlib import Path

import yaml

from quality import run  # bench/quality.py: one fit through the CLI -> (final val bits/byte, wall seconds)
from soma_lightning.cli.run_dir import last_checkpoint


def config(steps: int, student: bool) -> dict:
    """specs/quickstart.yaml for `steps` steps on windows of 64 bytes, validated at the end on 50 batches of the
    val split (51,200 bytes); with `student`, its model at the student's size."""
    quickstart = yaml.safe_load(open("specs/quickstart.yaml"))
    quickstart["data"]["init_args"] |= {"seq_len": 64, "val_seq_len": 64}
    quickstart["trainer"] |= {"max_steps": steps, "val_check_interval": steps, "limit_val_batches": 50, "callbacks": []}
    if student:
        arch = quickstart["model"]["arch"]
        arch |= {"d_model": 64, "n_layers": 2}
        arch["blocks"]["layer"][1]["ffn"]["hidden_dim"] = 256
    return quickstart


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="the student's steps, alone and distilled")
    p.add_argument("--teacher_steps", type=int, default=1000)
    p.add_argument("--distill", default="0.5:2", help="comma-separated WEIGHT:TEMPERATURE of the distilled arms")
    p.add_argument("--runs", default="runs/distill")
    p.add_argument("--out", default="distill.json")
    args = p.parse_args()
    runs = Path(args.runs)
    results = {"teacher": run("teacher", config(args.teacher_steps, student=False), runs)}
    teacher = last_checkpoint(runs / "teacher")
    results["student alone"] = run("alone", config(args.steps, student=True), runs)
    for arm in args.distill.split(","):
        weight, temperature = map(float, arm.split(":"))
        distilled = config(args.steps, student=True)
        distilled["model"]["distill"] = {"teacher": str(teacher), "weight": weight, "temperature": temperature}
        results[f"student distilled (weight {weight:g}, T {temperature:g})"] = run(f"distilled_w{weight:g}_t{temperature:g}", distilled, runs)

    print(f"{'run':40} {'val bits/byte':>14} {'wall s':>8}")
    for name, (bits, seconds) in results.items():
        print(f"{name:40} {bits:14.4f} {seconds:8.0f}")
    json.dump({
        "steps": args.steps, "teacher_steps": args.teacher_steps, "teacher": str(teacher),
        "val_bits_per_byte": {name: bits for name, (bits, _) in results.items()},
        "wall_seconds": {name: seconds for name, (_, seconds) in results.items()},
    }, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
