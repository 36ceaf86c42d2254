"""LoRA fine-tuning at small size, on CPU, all through the CLI: a base model trained on tiny Shakespeare, then
fine-tuned on a new corpus (Python source of this interpreter's standard library) three ways, same steps, seed
and batches, each starting from the base's exported weights (--model.init_weights):

1. base: specs/quickstart.yaml's model (d_model 128, 4 layers, 0.86 M parameters), --base_steps steps on tiny
   Shakespeare, exported with `export --layout state_dict`;
2. the new corpus: the top-level modules of the stdlib (sorted by name, whole files until --code_kb KB), one
   file in a temp dir; train/val by ByteCorpus's val_fraction (the last 10%);
3. arms, --steps steps each: full fine-tuning; LoRA (soma_lightning.callbacks.LoRA, rank --r, alpha 2r, on
   attention query/value and the MLP's linear_inner/linear_outer); no fine-tuning (the base itself).

Each arm's weights (a LoRA run's export merges its adapters) are validated with `soma-lightning validate
--model.init_weights` on the new corpus's val split and on tiny Shakespeare's (forgetting), the same val
batches for every arm. Both fine-tuning arms use the quickstart's optimizer settings (lr 2e-3, warmup 50,
cosine to 0.1, weight decay 0.1).

    OMP_NUM_THREADS=1 python bench/lora.py --out lora.json [--base_steps 400] [--steps 200] [--r 8]

Prints, per arm: trainable parameters, val bits/byte on both corpora, seconds per training step (the
Throughput callback's tokens/s, and the fit's wall time / steps, which includes setup and validation).
"""

import argparse
import csv
import json
import sysconfig
import tempfile
from pathlib import Path

import yaml

from quality import run  # bench/quality.py: one fit through the CLI -> (final val bits/byte, wall seconds)
from soma_lightning.callbacks.lora import inject_lora
from soma_lightning.cli import cli_main
from soma_lightning.cli.export import export_checkpoint
from soma_lightning.cli.run_dir import last_checkpoint
from soma_lightning.spec import build_model

TARGETS = r".*(attention\.(query|value)|pwff\.linear_(inner|outer))"
VAL_BATCHES = 50


def config(steps: int, source: str | None) -> dict:
    """specs/quickstart.yaml for `steps` steps on `source` (None: tiny Shakespeare), validated at the end on up
    to VAL_BATCHES batches of the val split, with the Throughput callback."""
    quickstart = yaml.safe_load(open("specs/quickstart.yaml"))
    quickstart["data"]["init_args"]["source"] = source
    quickstart["trainer"] |= {"max_steps": steps, "val_check_interval": steps, "limit_val_batches": VAL_BATCHES,
                              "callbacks": [{"class_path": "soma_lightning.callbacks.Throughput"}]}
    return quickstart


def code_corpus(kb: int, folder: Path) -> tuple[Path, list[str]]:
    """The stdlib's top-level modules, sorted, whole files until `kb` KB, joined into one file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chosen, text = [], b""
    for path in sorted(stdlib.glob("*.py")):
        if len(text) >= kb * 1024:
            break
        text += path.read_bytes() + b"\n"
        chosen.append(path.name)
    out = folder / "stdlib_code.txt"
    out.write_bytes(text)
    return out, chosen


def seconds_per_step(runs: Path, name: str, tokens_per_step: int) -> float:
    """The mean of the Throughput callback's logged tokens/s, as seconds per step (excludes setup and validation)."""
    version = max((runs / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rates = [float(r["train/tokens_per_s"]) for r in csv.DictReader(open(version / "metrics.csv")) if r.get("train/tokens_per_s")]
    return tokens_per_step / (sum(rates) / len(rates)) if rates else float("nan")


def validate(weights: Path, source: str | None, name: str, runs: Path) -> float:
    """val bits/byte of `weights` on `source`'s val split (None: tiny Shakespeare), through `soma-lightning validate`."""
    cfg = config(1, source)
    cfg["model"]["init_weights"] = str(weights)
    cfg["trainer"] |= {"enable_progress_bar": False, "enable_model_summary": False, "callbacks": [],
                       "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(runs), "name": name}}}
    path = Path(tempfile.mkdtemp()) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli_main(["validate", "--config", str(path)])
    return float(json.loads((runs / name / "validate-untrained.json").read_text())["val/bits_per_byte"])


def trainable(lora_r: int | None) -> tuple[int, int]:
    """(trainable, total) parameters of the quickstart model, with LoRA adapters of rank lora_r if given, as the
    LoRA callback sets them up (inject_lora, then only lora_ parameters trainable)."""
    model = build_model(yaml.safe_load(open("specs/quickstart.yaml"))["model"]["arch"])
    if lora_r is not None:
        inject_lora(model, {"target_modules": TARGETS, "r": lora_r, "alpha": 2 * lora_r, "dropout": 0.0})
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=200, help="the fine-tuning steps of each arm")
    p.add_argument("--r", type=int, default=8, help="the LoRA rank (alpha is 2r)")
    p.add_argument("--code_kb", type=int, default=600, help="size of the new corpus (KB of stdlib source)")
    p.add_argument("--runs", default="runs/lora")
    p.add_argument("--out", default="lora.json")
    args = p.parse_args()
    runs = Path(args.runs)
    work = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    code, files = code_corpus(args.code_kb, work)
    quick = yaml.safe_load(open("specs/quickstart.yaml"))["data"]["init_args"]
    tokens_per_step = quick["batch_size"] * quick["seq_len"]

    base_bits, base_wall = run("base", config(args.base_steps, None), runs)
    base = work / "base.safetensors"
    export_checkpoint(str(last_checkpoint(runs / "base")), str(base), layout="state_dict")

    arms: dict[str, dict] = {}
    for arm in ("full", "lora"):
        cfg = config(args.steps, str(code))
        cfg["model"]["init_weights"] = str(base)
        if arm == "lora":
            cfg["trainer"]["callbacks"].append({"class_path": "soma_lightning.callbacks.LoRA",
                                                "init_args": {"target_modules": TARGETS, "r": args.r, "alpha": 2 * args.r, "dropout": 0.0}})
        bits, wall = run(arm, cfg, runs)
        weights = work / f"{arm}.safetensors"
        export_checkpoint(str(last_checkpoint(runs / arm)), str(weights), which="last", layout="state_dict")
        arms[arm] = {"weights": weights, "fit_val_bits_per_byte": bits, "fit_wall_s": wall,
                     "s_per_step": seconds_per_step(runs, arm, tokens_per_step), "wall_s_per_step": wall / args.steps}
    arms["none"] = {"weights": base, "fit_val_bits_per_byte": None, "fit_wall_s": 0.0, "s_per_step": None, "wall_s_per_step": None}

    names = {"full": "full fine-tuning", "lora": f"LoRA r={args.r}", "none": "no fine-tuning (base)"}
    for arm, result in arms.items():
        result["trainable"], result["total"] = trainable(args.r if arm == "lora" else None)
        if arm == "none":
            result["trainable"] = 0
        result["code_val_bits_per_byte"] = validate(result["weights"], str(code), f"eval_{arm}_code", runs)
        result["shakespeare_val_bits_per_byte"] = validate(result["weights"], None, f"eval_{arm}_shakespeare", runs)

    print(f"\nbase: {args.base_steps} steps on tiny Shakespeare, val bits/byte {base_bits:.4f}, {base_wall:.0f} s; "
          f"new corpus: {len(files)} stdlib modules ({code.stat().st_size // 1024} KB), fine-tuning {args.steps} steps\n")
    print(f"{'arm':24} {'trainable':>10} {'% of all':>8} {'code bpb':>9} {'shakesp. bpb':>12} {'s/step':>7} {'wall s/step':>11}")
    for arm, r in arms.items():
        step = f"{r['s_per_step']:7.3f}" if r["s_per_step"] is not None else f"{'-':>7}"
        wall = f"{r['wall_s_per_step']:11.3f}" if r["wall_s_per_step"] is not None else f"{'-':>11}"
        print(f"{names[arm]:24} {r['trainable']:10,} {100 * r['trainable'] / r['total']:7.2f}% {r['code_val_bits_per_byte']:9.4f} "
              f"{r['shakespeare_val_bits_per_byte']:12.4f} {step} {wall}")
    json.dump({
        "base_steps": args.base_steps, "steps": args.steps, "r": args.r, "alpha": 2 * args.r, "target_modules": TARGETS,
        "code_files": files, "code_bytes": code.stat().st_size, "val_batches": VAL_BATCHES,
        "base": {"shakespeare_val_bits_per_byte_at_fit_end": base_bits, "wall_s": base_wall},
        "arms": {names[arm]: {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for arm, r in arms.items()},
    }, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
