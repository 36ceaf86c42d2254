"""Data-parallel scaling on one host, side by side in one run; prints a table and writes JSON.

    python bench/scale_out.py --config specs/soma_v1.yaml --global-batch 16 --steps 60 --out scale_out.json

Trains the spec through `soma-lightning fit` with the same global batch four ways: one GPU; DDP and FSDP2 on
two GPUs (the specs/strategies overlays); and two "nodes" of one GPU each, launched by two `torchrun
--nnodes 2` processes meeting at a localhost rendezvous (what a 2-node job does, with each node's GPU
picked by CUDA_VISIBLE_DEVICES). Reports tokens/s per GPU (the Throughput callback's, averaged over the
second half of the run) against one GPU's, and how far the first `--compare-steps` losses of each run are
from the one-GPU run's. Dropout and SIGReg are off, so that the loss is a mean over rows and a 2-GPU step
is the 1-GPU step up to floating-point order.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def fit_args(args: argparse.Namespace, root: Path, name: str, per_device_batch: int, extra: list[str]) -> list[str]:
    return [
        "fit", "--config", args.config, *extra,
        "--data.init_args.batch_size", str(per_device_batch), "--model.arch.dropout", "0", "--model.sigreg.coefficient", "0",
        "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0",
        "--trainer.logger=" + json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root), "name": name}}),
        "--trainer.callbacks=" + json.dumps([{"class_path": "soma_lightning.callbacks.Throughput"}]),
    ]


def launch(name: str, commands: list[tuple[list[str], dict]], log: Path) -> None:
    """Run the commands concurrently (one per node), wait for all; raise with the log tail on failure."""
    with open(log, "w") as out:
        procs = [subprocess.Popen(cmd, env=os.environ | env, stdout=out, stderr=subprocess.STDOUT) for cmd, env in commands]
        codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"{name}: exit codes {codes}\n" + log.read_text()[-3000:])


def read_run(root: Path, name: str) -> tuple[list[float], list[float]]:
    """(train/ce by step, train/tokens_per_s values) of a run's metrics.csv."""
    rows = list(csv.DictReader(open(root / name / "version_0" / "metrics.csv")))
    ce = {int(r["step"]): float(r["train/ce"]) for r in rows if r.get("train/ce")}
    tps = [float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")]
    return [ce[s] for s in sorted(ce)], tps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="specs/soma_v1.yaml")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--compare-steps", type=int, default=50)
    p.add_argument("--runs", default="one_gpu,ddp,fsdp2,two_nodes")
    p.add_argument("--weak", action="store_true", help="every GPU takes the whole --global-batch (weak scaling: the global batch grows with the GPUs; no loss comparison)")
    p.add_argument("--out", default="scale_out.json")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scale_out_"))
    cli = [sys.executable, "-m", "soma_lightning"]
    half = args.global_batch if args.weak else args.global_batch // 2
    runs = {
        "one_gpu": (1, [(cli + fit_args(args, root, "one_gpu", args.global_batch, ["--trainer.devices", "1"]), {})]),
        "ddp": (2, [(cli + fit_args(args, root, "ddp", half, ["--config", "specs/strategies/ddp.yaml", "--trainer.devices", "2"]), {})]),
        "fsdp2": (2, [(cli + fit_args(args, root, "fsdp2", half, ["--config", "specs/strategies/fsdp2.yaml", "--trainer.devices", "2"]), {})]),
        "two_nodes": (2, [
            (
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                 "--master-addr", "localhost", "--master-port", "29517", "-m", "soma_lightning"]
                + fit_args(args, root, "two_nodes", half, ["--config", "specs/strategies/ddp.yaml", "--trainer.devices", "1", "--trainer.num_nodes", "2"]),
                {"CUDA_VISIBLE_DEVICES": str(node)},
            )
            for node in (0, 1)
        ]),
    }
    results = {}
    for name in args.runs.split(","):
        gpus, commands = runs[name]
        launch(name, commands, root / f"{name}.log")
        ce, tps = read_run(root, name)
        results[name] = {"gpus": gpus, "tokens_per_s": sum(tps[len(tps) // 2 :]) / len(tps[len(tps) // 2 :]), "ce": ce}
        print(f"{name}: done, {results[name]['tokens_per_s']:.0f} tokens/s", flush=True)
    base = results.get("one_gpu")
    print(f"{args.config}: {'per-GPU' if args.weak else 'global'} batch {args.global_batch}, {args.steps} steps, logs in {root}")
    print(f"{'run':10} {'GPUs':>4} {'tokens/s':>10} {'per GPU':>9} {'vs 1 GPU':>9} {'max |ce - 1 GPU| (first ' + str(args.compare_steps) + ')':>30}")
    for name, r in results.items():
        per_gpu = r["tokens_per_s"] / r["gpus"]
        r["per_gpu_vs_one"] = per_gpu / base["tokens_per_s"] if base else None
        n = min(args.compare_steps, len(r["ce"]), len(base["ce"])) if base and not args.weak else 0
        r["max_ce_diff"] = max(abs(a - b) for a, b in zip(r["ce"][:n], base["ce"][:n])) if n else None
        vs = f"{r['per_gpu_vs_one']:9.1%}" if base else f"{'':9}"
        diff = f"{r['max_ce_diff']:30.2e}" if n else f"{'':30}"
        print(f"{name:10} {r['gpus']:4d} {r['tokens_per_s']:10.0f} {per_gpu:9.0f} {vs} {diff}")
    json.dump({"config": args.config, "global_batch": args.global_batch, "weak": args.weak, "steps": args.steps, "runs": results}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
