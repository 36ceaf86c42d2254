"""Scaling on one host, side by side in one run: data parallel, FSDP2, expert, tensor and context parallel at the
same global batch; prints a table and writes JSON.

    python bench/scale_out.py --config specs/soma_v1.yaml --global-batch 16 --steps 60 --out scale_out.json
    python bench/scale_out.py --config specs/soma_v1.yaml --runs one_gpu,ddp,fsdp2 --gpus 2,4,8 --out v1_scaling.json
    python bench/scale_out.py --config specs/gpt5_moe.yaml --runs fsdp2,ep2,ep4,ep8 --gpus 8 --global-batch 16 --out moe_ep.json
    python bench/scale_out.py --config specs/soma_v1.yaml --runs one_gpu,fsdp2,tp2,tp4 --gpus 2,4,8 --out v1_tp.json
    python bench/scale_out.py --config specs/gpt5_moe_tiny.yaml --accelerator cpu --runs one_gpu,fsdp2,ep2,tp2 --global-batch 4 --steps 6 --compare-steps 5

Trains the spec (`--config`, repeatable like fit's: later files override earlier ones) through
`soma-lightning fit`, one run after another, each with the same global batch of `--global-batch` sequences:

| run | what |
|---|---|
| one_gpu | one GPU, no strategy |
| mesh_one_gpu | the `--parallel.*` mesh with every degree 1 on one GPU (specs/strategies/parallel.yaml: FSDP2 over one rank, applied by `parallelize`) |
| ddp, fsdp2 | the specs/strategies overlays on each GPU count of `--gpus` |
| epN, tpN, cpN | specs/strategies/parallel.yaml with `--parallel.ep/tp/cp N` on each GPU count of `--gpus` that is a multiple of N, FSDP2 over the rest (`--parallel.dp_shard -1`) |
| two_nodes | DDP as two "nodes" of one GPU each: two `torchrun --nnodes 2` processes meeting at a localhost rendezvous (what a 2-node job does, each node's GPU picked by CUDA_VISIBLE_DEVICES) |

Those five are named `RUN@GPUS` (fsdp2@8, ep4@8); `--runs cp4@4,cp8@8` picks a count for one run instead of
`--gpus`. The ranks that read different batches (R = GPUs / (tp x cp)) split the global batch. Each run logs
through the Throughput callback: tokens/s (averaged over the second half of the run; per GPU against
one_gpu's) and the peak memory of its largest rank (torch.cuda.max_memory_allocated; none on a CPU). Each
run's first `--compare-steps` losses (train/ce) are compared with those of its reference: for epN, tpN and
cpN the fsdp2 run whose ranks read the same batches (fsdp2@R; one_gpu for R = 1, or where fsdp2@R did not
run), since MoE capacity and balancing losses count a rank's own tokens; one_gpu for the others. Dropout and
SIGReg are off, so that the loss is a mean over rows and a parallel step is the one-GPU step up to
floating-point order; `--tolerance` is the largest difference that counts as equal.

`--seq-len` trains every run at that sequence length (data.init_args.seq_len and model.arch.max_seq_len).
`--fit-args` adds arguments to every run's `soma-lightning fit` (e.g. `--model.activation_checkpointing
true`); `--ddp-bucket-mb` sets DDP's gradient bucket size (bucket_cap_mb, torch's default 25) of the ddp and
two_nodes runs. Context parallel supports causal attention over the whole window only, without n-gram
embeddings or document masks (docs/scale_out.md): add an overlay with `--config` for specs that have them.

`--accelerator cpu` runs the same commands on CPU processes over gloo (a "GPU" is then a process), to check
the harness with a tiny spec; context parallel needs CUDA (ring attention) and is refused there.
"""

import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

FIXED = ("one_gpu", "mesh_one_gpu", "two_nodes")  # runs with their own GPU count
SCALED = ("ddp", "fsdp2")  # runs on each count of --gpus
MESH = re.compile(r"(ep|tp|cp)([1-9][0-9]*)")  # --parallel.ep/tp/cp N


@dataclass
class Run:
    gpus: int
    commands: list[tuple[list[str], dict[str, str]]]  # one per node, run concurrently
    reference: str | None  # the run whose losses this one's are compared with


def fit_args(args: argparse.Namespace, root: Path, name: str, per_device_batch: int, extra: list[str]) -> list[str]:
    configs = [a for config in args.config for a in ("--config", config)]
    seq_len = ["--data.init_args.seq_len", str(args.seq_len), "--model.arch.max_seq_len", str(args.seq_len)] if args.seq_len else []
    return [
        "fit", *configs, *extra, *seq_len, "--trainer.accelerator", args.accelerator,
        "--data.init_args.batch_size", str(per_device_batch), "--model.arch.dropout", "0", "--model.sigreg.coefficient", "0",
        "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0",
        "--trainer.logger=" + json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root), "name": name}}),
        "--trainer.callbacks=" + json.dumps([{"class_path": "soma_lightning.callbacks.Throughput"}]),
        *shlex.split(args.fit_args),
    ]


def plan_runs(args: argparse.Namespace, root: Path) -> dict[str, Run]:
    """The runs `--runs` and `--gpus` ask for, by name, in order; a ValueError names a request that cannot run."""
    cli = [sys.executable, "-m", "soma_lightning"]
    requests = [(kind, count) for kind, _, count in (request.partition("@") for request in args.runs.split(","))]
    bucket = ["--trainer.strategy.init_args.bucket_cap_mb", str(args.ddp_bucket_mb)] if args.ddp_bucket_mb else []

    def batch(name: str, replicas: int) -> int:
        """Sequences per rank of run `name`, whose ranks read `replicas` different batches."""
        if args.weak:
            return args.global_batch
        if args.global_batch % replicas:
            raise ValueError(f"{name}: --global-batch {args.global_batch} does not split over its {replicas} ranks that read different batches")
        return args.global_batch // replicas

    def fit(name: str, replicas: int, extra: list[str]) -> list[str]:
        return cli + fit_args(args, root, name, batch(name, replicas), extra)

    runs: dict[str, Run] = {}
    for kind, count in requests:
        if count and (not count.isdigit() or int(count) < 1):
            raise ValueError(f"{kind}@{count}: expected a GPU count of at least 1 after @")
        counts = [int(count)] if count else args.gpus
        mesh = MESH.fullmatch(kind)
        if kind in FIXED and count:
            raise ValueError(f"{kind}@{count}: {kind} has its own GPU count")
        if kind in ("one_gpu", "mesh_one_gpu"):
            overlay = ["--config", "specs/strategies/parallel.yaml"] if kind == "mesh_one_gpu" else []
            runs[kind] = Run(1, [(fit(kind, 1, overlay + ["--trainer.devices", "1"]), {})], None if kind == "one_gpu" else "one_gpu")
        elif kind == "two_nodes":
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "localhost", "--master-port", "29517"]
            node_args = fit_args(args, root, kind, batch(kind, 2), ["--config", "specs/strategies/ddp.yaml", "--trainer.devices", "1", "--trainer.num_nodes", "2", *bucket])
            nodes = [
                (torchrun + ["--node-rank", str(node), "-m", "soma_lightning"] + node_args, {"CUDA_VISIBLE_DEVICES": str(node)} if args.accelerator == "gpu" else {})
                for node in (0, 1)
            ]
            runs[kind] = Run(2, nodes, "one_gpu")
        elif kind in SCALED:
            for n in counts:
                extra = ["--config", f"specs/strategies/{kind}.yaml", "--trainer.devices", str(n), *(bucket if kind == "ddp" else [])]
                runs[f"{kind}@{n}"] = Run(n, [(fit(f"{kind}@{n}", n, extra), {})], "one_gpu")
        elif mesh:
            dim, degree = mesh.group(1), int(mesh.group(2))
            if dim == "cp" and args.accelerator == "cpu":
                raise ValueError(f"{kind}: context parallel needs CUDA (ring attention); not with --accelerator cpu")
            if not [n for n in counts if n % degree == 0]:
                raise ValueError(f"{kind}{'@' + count if count else ''}: no GPU count of {count or ','.join(map(str, args.gpus))} is a multiple of {degree}")
            for n in (n for n in counts if n % degree == 0):
                replicas = n if dim == "ep" else n // degree  # tp and cp ranks share their batches
                extra = ["--config", "specs/strategies/parallel.yaml", "--trainer.devices", str(n), f"--parallel.{dim}", str(degree)]
                reference = f"fsdp2@{replicas}" if replicas > 1 else "one_gpu"
                runs[f"{kind}@{n}"] = Run(n, [(fit(f"{kind}@{n}", replicas, extra), {})], reference)
        else:
            raise ValueError(f"{kind}: unknown run; expected one of {', '.join([*FIXED, *SCALED])}, epN, tpN or cpN, the last five optionally @GPUS")
    for run in runs.values():
        if run.reference not in runs:
            run.reference = "one_gpu" if run.reference and "one_gpu" in runs else None
    return runs


def launch(commands: list[tuple[list[str], dict[str, str]]], log: Path) -> str | None:
    """Run the commands concurrently (one per node) and wait for all. None when all succeeded, else the exit
    codes and the log's tail."""
    with open(log, "w") as out:
        procs = [subprocess.Popen(cmd, env=os.environ | env, stdout=out, stderr=subprocess.STDOUT) for cmd, env in commands]
        codes = [p.wait() for p in procs]
    return f"exit codes {codes}, log {log}:\n" + log.read_text()[-3000:] if any(codes) else None


def read_run(root: Path, name: str) -> tuple[dict[int, float], list[float], float | None]:
    """(train/ce by step, train/tokens_per_s values, the last train/peak_memory_gib or None) of a run's metrics.csv."""
    rows = list(csv.DictReader(open(root / name / "version_0" / "metrics.csv")))
    ce = {int(r["step"]): float(r["train/ce"]) for r in rows if r.get("train/ce")}
    tps = [float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")]
    memory = [float(r["train/peak_memory_gib"]) for r in rows if r.get("train/peak_memory_gib")]
    return ce, tps, memory[-1] if memory else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="a spec or overlay, repeatable (default specs/soma_v1.yaml)")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--compare-steps", type=int, default=50)
    p.add_argument("--tolerance", type=float, default=1e-4, help="the largest |ce - reference ce| that counts as equal")
    p.add_argument("--runs", default="one_gpu,ddp,fsdp2,two_nodes", help="comma-separated: one_gpu, mesh_one_gpu, two_nodes, and ddp, fsdp2, epN, tpN, cpN, each optionally @GPUS")
    p.add_argument("--gpus", default="2", help="comma-separated GPU counts of the ddp, fsdp2, epN, tpN and cpN runs")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence of every run (default: the spec's data.init_args.seq_len)")
    p.add_argument("--ddp-bucket-mb", type=float, default=None, help="DDP's bucket_cap_mb for the ddp and two_nodes runs")
    p.add_argument("--fit-args", default="", help="more arguments for every run's `soma-lightning fit`, one string")
    p.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--weak", action="store_true", help="every rank that reads its own batches takes the whole --global-batch (weak scaling: no loss comparison)")
    p.add_argument("--dry-run", action="store_true", help="print each run's command lines and exit")
    p.add_argument("--out", default="scale_out.json")
    args = p.parse_args()
    args.config = args.config or ["specs/soma_v1.yaml"]
    try:
        gpus = [int(n) for n in args.gpus.split(",")]
        if min(gpus) < 1:
            raise ValueError
    except ValueError:
        p.exit(2, f"{p.prog}: error: --gpus: expected comma-separated GPU counts of at least 1, got {args.gpus!r}\n")
    args.gpus = gpus
    root = Path(tempfile.mkdtemp(prefix="scale_out_"))
    try:
        runs = plan_runs(args, root)
    except ValueError as e:
        root.rmdir()
        p.exit(2, f"{p.prog}: error: {e}\n")
    if args.dry_run:
        root.rmdir()
        for name, run in runs.items():
            print(f"# {name}: {run.gpus} GPUs, losses against {run.reference or 'none'}")
            for command, env in run.commands:
                print(" ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + shlex.join(command))
        return
    results, losses = {}, {}
    for name, run in runs.items():
        failure = launch(run.commands, root / f"{name.replace('@', '_')}.log")
        if failure:  # e.g. out of memory: the other runs still run
            results[name] = {"gpus": run.gpus, "failed": failure, "command": shlex.join(run.commands[0][0])}
            print(f"{name}: failed, {failure}", flush=True)
            continue
        losses[name], tps, memory = read_run(root, name)
        second_half = tps[len(tps) // 2 :]
        results[name] = {
            "gpus": run.gpus, "reference": None if args.weak else run.reference,
            "tokens_per_s": sum(second_half) / len(second_half), "peak_memory_gib": memory, "ce": [losses[name][s] for s in sorted(losses[name])],
            "command": shlex.join(run.commands[0][0]),
        }
        print(f"{name}: done, {results[name]['tokens_per_s']:.0f} tokens/s", flush=True)
    base = results["one_gpu"] if "one_gpu" in losses else None
    device = "GPUs" if args.accelerator == "gpu" else "CPU processes"
    print(f"{' + '.join(args.config)}: {'per-replica' if args.weak else 'global'} batch {args.global_batch}"
          f"{f' x {args.seq_len} tokens' if args.seq_len else ''}, {args.steps} steps, on {device}; logs in {root}")
    print(f"{'run':14} {'GPUs':>4} {'tokens/s':>10} {'per GPU':>9} {'vs 1 GPU':>9} {'peak GiB':>9} {'reference':>10} {'max |ce - ref| (first ' + str(args.compare_steps) + ')':>28}")
    for name, r in results.items():
        if "failed" in r:
            print(f"{name:14} {r['gpus']:4d} failed: {r['failed'].splitlines()[0]}")
            continue
        per_gpu = r["tokens_per_s"] / r["gpus"]
        r["per_gpu_vs_one"] = per_gpu / base["tokens_per_s"] if base else None
        ce, reference = losses[name], losses.get(r["reference"], {})
        steps = [s for s in sorted(ce) if s < args.compare_steps and s in reference]
        r["max_ce_diff"] = max(abs(ce[s] - reference[s]) for s in steps) if steps else None
        r["losses_agree"] = r["max_ce_diff"] <= args.tolerance if steps else None
        vs = f"{r['per_gpu_vs_one']:9.1%}" if base else f"{'':9}"
        memory = f"{r['peak_memory_gib']:9.2f}" if r["peak_memory_gib"] is not None else f"{'-':>9}"
        diff = f"{r['max_ce_diff']:.2e} ({'equal' if r['losses_agree'] else 'differ'})" if steps else ""
        print(f"{name:14} {r['gpus']:4d} {r['tokens_per_s']:10.0f} {per_gpu:9.0f} {vs} {memory} {r['reference'] or '':>10} {diff:>28}")
    json.dump({
        "config": args.config, "global_batch": args.global_batch, "seq_len": args.seq_len, "weak": args.weak, "steps": args.steps,
        "compare_steps": args.compare_steps, "tolerance": args.tolerance, "accelerator": args.accelerator, "runs": results,
    }, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
