"""Quality at equal steps, on real data, both arms of each comparison in one run (CPU is enough):

1. identity embeddings (hashed 2/3/4-grams) off vs on: specs/quickstart.yaml on tiny Shakespeare;
2. structural attention bias off vs on: a small GQA code model on the CPython standard library (the
   top-level modules of this interpreter's stdlib), documents joined by EOS, document-aware masks.

    python bench/quality.py --out quality.json

Prints the final val bits/byte of each arm and writes JSON. Each run's logs go under --runs.
"""

import argparse
import csv
import json
import sysconfig
import tempfile
from pathlib import Path

import yaml

from soma_lightning.cli import cli_main

IDENTITY = {"type": "hashed_ngram", "ngram_sizes": [2, 3, 4], "num_tables": 2, "buckets": 8192}


def code_model(structure: bool) -> dict:
    mixer = {"type": "gqa", "num_heads": 4, "num_kv_heads": 2}
    if structure:
        mixer["structure_buckets"] = 16
    return {
        "d_model": 128, "n_layers": 4, "max_seq_len": 256,
        "blocks": {"layer": [{"norm": "rmsnorm", "mixer": mixer}, {"norm": "rmsnorm", "ffn": {"type": "gelu_mlp", "hidden_dim": 512}}]},
        "final_norm": "rmsnorm",
    }


def run(name: str, config: dict, runs: Path) -> float:
    config["trainer"] |= {"enable_progress_bar": False, "enable_model_summary": False}
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(runs), "name": name}}
    path = Path(tempfile.mkdtemp()) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cli_main(["fit", "--config", str(path)])
    version = max((runs / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = [r for r in csv.DictReader(open(version / "metrics.csv")) if r.get("val/bits_per_byte")]
    return float(rows[-1]["val/bits_per_byte"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", default=str(Path(sysconfig.get_paths()["stdlib"]) / "*.py"), help="glob of the code corpus")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--runs", default="runs/quality")
    p.add_argument("--out", default="quality.json")
    args = p.parse_args()
    runs = Path(args.runs)
    results = {}

    quickstart = yaml.safe_load(open("specs/quickstart.yaml"))
    quickstart["trainer"]["max_steps"] = args.steps
    for arm in ("off", "on"):
        config = json.loads(json.dumps(quickstart))
        if arm == "on":
            config["model"]["arch"]["input_embeddings"] = [IDENTITY]
        results[f"identity embeddings {arm}"] = run(f"identity_{arm}", config, runs)

    for arm in ("off", "on"):
        config = {
            "seed_everything": 0,
            "model": {"arch": code_model(arm == "on"), "optim": {"lr": 2e-3, "warmup_steps": 50}},
            "data": {"class_path": "soma_lightning.data_modules.ByteCorpus", "init_args": {
                "source": args.code, "seq_len": 256, "batch_size": 16, "val_seq_len": 256, "doc_ids": True, "structure": arm == "on"}},
            "trainer": {"accelerator": "cpu", "max_steps": args.steps, "val_check_interval": args.steps, "check_val_every_n_epoch": None, "limit_val_batches": 40},
        }
        results[f"structural bias {arm}"] = run(f"structure_{arm}", config, runs)

    print(f"{'arm':28} {'val bits/byte':>14}")
    for name, bits in results.items():
        print(f"{name:28} {bits:14.4f}")
    json.dump({"steps": args.steps, "code": args.code, "val_bits_per_byte": results}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
