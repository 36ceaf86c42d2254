"""Quality at equal steps, on real data, both arms of each comparison in one run (CPU is enough):

1. identity embeddings (hashed 2/3/4-grams) off vs on: specs/quickstart.yaml on tiny Shakespeare;
2. structural attention bias off vs on: a small GQA code model on the CPython standard library (the
   top-level modules of this interpreter's stdlib), documents joined by EOS, document-aware masks;
3. SOSM vs the dense causal model at (nearly) equal parameters: specs/quickstart.yaml with its token table
   and attention replaced by sosm_tiny.yaml's semantic state and graph attention, on tiny Shakespeare and
   on the stdlib code;
4. why specs/gpt5_moe.yaml learns slower than specs/hybrid_small.yaml: both scaled to 4 layers of d_model 128 on
   the stdlib code, with their optimizer settings (batches of 8); the gpt5 arm alone and with one ingredient changed each.

    python bench/quality.py --out quality.json [--comparisons identity,structure,sosm,moe_ablation]

Prints the final val bits/byte and wall time of each arm and writes JSON. Each run's logs go under --runs.
"""

import argparse
import csv
import json
import sysconfig
import tempfile
import time
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


def sosm(config: dict) -> dict:
    """The config's model with SOSM's input and attention (the graph settings of specs/sosm_tiny.yaml)."""
    config = json.loads(json.dumps(config))
    arch = config["model"]["arch"]
    tiny = yaml.safe_load(open("specs/sosm_tiny.yaml"))["model"]["arch"]
    arch["token_embedding"] = tiny["token_embedding"] | {"graph": tiny["token_embedding"]["graph"] | {"chunk_size": 256}}
    mixer = arch["blocks"]["layer"][0]["mixer"]
    arch["blocks"]["layer"][0]["mixer"] = {"type": "graph_attention", "num_heads": mixer["num_heads"]}
    return config


def gpt5_small(init_std: float | None = None, identity: bool = True, structure: bool = True, aux_loss_weight: float = 0.01, window: bool = True) -> dict:
    """specs/gpt5_moe.yaml's architecture at code_model's size (4 layers, the structural bias in the last; a
    window of 64 keys plus every 32nd key), with the ingredients the arguments name changed. init_std None is
    PyTorch's default init, the spec's until it took 0.02 from this ablation and the H100 runs."""
    arch = yaml.safe_load(open("specs/gpt5_moe.yaml"))["model"]["arch"]
    arch |= {"d_model": 128, "n_layers": 4, "max_seq_len": 256, "init_std": init_std, "pattern": ["layer"] * 3 + ["structured" if structure else "layer"]}
    if not identity:
        arch["input_embeddings"] = ["modality"]
    for attention, moe in arch["blocks"].values():
        attention["mixer"] |= {"num_heads": 4, "num_kv_heads": 1} | ({"window": 64, "global_stride": 32} if window else {"window": None, "global_stride": None})
        moe["ffn"] |= {"hidden_dim": 256, "aux_loss_weight": aux_loss_weight}
    return arch


def hybrid_small(init_std: float | None = None) -> dict:
    """specs/hybrid_small.yaml's architecture at the same budget: 2 superblocks of d_model 128 (2 Gated DeltaNet, 2
    GQA and 4 MoE layers); Gated DeltaNet and MoE widths scaled with d_model, GQA as in gpt5_small."""
    arch = yaml.safe_load(open("specs/hybrid_small.yaml"))["model"]["arch"]
    arch |= {"d_model": 128, "n_layers": 2, "max_seq_len": 256, "init_std": init_std}
    gdn, moe, attention, _, _ = arch["blocks"]["superblock"]  # the two MoE sublayers share one YAML anchor
    gdn["mixer"] |= {"num_heads": 2, "num_v_heads": 4, "head_dim": 32}
    moe["ffn"] |= {"hidden_dim": 64}
    attention["mixer"] |= {"num_heads": 4, "num_kv_heads": 1, "head_dim": 32}
    return arch


def run(name: str, config: dict, runs: Path) -> tuple[float, float]:
    """-> (final val bits/byte, wall seconds)."""
    start = time.perf_counter()
    config["trainer"] |= {"enable_progress_bar": False, "enable_model_summary": False}
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(runs), "name": name}}
    path = Path(tempfile.mkdtemp()) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cli_main(["fit", "--config", str(path)])
    version = max((runs / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = [r for r in csv.DictReader(open(version / "metrics.csv")) if r.get("val/bits_per_byte")]
    return float(rows[-1]["val/bits_per_byte"]), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", default=str(Path(sysconfig.get_paths()["stdlib"]) / "*.py"), help="glob of the code corpus")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--runs", default="runs/quality")
    p.add_argument("--comparisons", default="identity,structure,sosm")
    p.add_argument("--out", default="quality.json")
    args = p.parse_args()
    comparisons = args.comparisons.split(",")
    runs = Path(args.runs)
    results = {}

    quickstart = yaml.safe_load(open("specs/quickstart.yaml"))
    quickstart["trainer"]["max_steps"] = args.steps
    if "identity" in comparisons:
        for arm in ("off", "on"):
            config = json.loads(json.dumps(quickstart))
            if arm == "on":
                config["model"]["arch"]["input_embeddings"] = [IDENTITY]
            results[f"identity embeddings {arm}"] = run(f"identity_{arm}", config, runs)

    def code_config(arch: dict, structure: bool) -> dict:
        return {
            "seed_everything": 0,
            "model": {"arch": arch, "optim": {"lr": 2e-3, "warmup_steps": 50}},
            "data": {"class_path": "soma_lightning.data_modules.ByteCorpus", "init_args": {
                "source": args.code, "seq_len": 256, "batch_size": 16, "val_seq_len": 256, "doc_ids": True, "structure": structure}},
            "trainer": {"accelerator": "cpu", "max_steps": args.steps, "val_check_interval": args.steps, "check_val_every_n_epoch": None, "limit_val_batches": 40},
        }

    if "structure" in comparisons:
        for arm in ("off", "on"):
            results[f"structural bias {arm}"] = run(f"structure_{arm}", code_config(code_model(arm == "on"), arm == "on"), runs)

    if "sosm" in comparisons:
        text_code = {"shakespeare": quickstart, "stdlib": code_config(quickstart["model"]["arch"], False)}
        for corpus, config in text_code.items():
            results[f"dense causal, {corpus}"] = run(f"dense_{corpus}", json.loads(json.dumps(config)), runs)
            results[f"sosm, {corpus}"] = run(f"sosm_{corpus}", sosm(config), runs)

    if "moe_ablation" in comparisons:
        arms = {
            "gpt5": gpt5_small(),
            "gpt5, seed 1": gpt5_small(),
            "gpt5, init_std 0.02": gpt5_small(init_std=0.02),
            "gpt5, no n-gram embeddings": gpt5_small(identity=False),
            "gpt5, no structural bias": gpt5_small(structure=False),
            "gpt5, aux weight 0.001": gpt5_small(aux_loss_weight=0.001),
            "gpt5, full causal": gpt5_small(window=False),
            "hybrid": hybrid_small(),
            "gpt5, init_std 0.02, no n-gram": gpt5_small(init_std=0.02, identity=False),
            "gpt5, init_std 0.02, aux 0.001": gpt5_small(init_std=0.02, aux_loss_weight=0.001),
            "hybrid, init_std 0.02": hybrid_small(init_std=0.02),
        }
        optim = yaml.safe_load(open("specs/gpt5_moe.yaml"))["model"]["optim"]  # the same in hybrid_small.yaml
        for name, arch in arms.items():
            config = code_config(arch, "structured" in arch.get("pattern", []))
            config["model"]["optim"] = optim
            config["trainer"]["gradient_clip_val"] = 1.0
            config["data"]["init_args"]["batch_size"] = 8  # half of code_config's: about 3 minutes an arm for 400 steps on one core
            if name.endswith("seed 1"):
                config["seed_everything"] = config["data"]["init_args"]["seed"] = 1
            results[name] = run(name.replace(", ", "_").replace(" ", "_"), config, runs)

    print(f"{'arm':32} {'val bits/byte':>14} {'wall s':>8}")
    for name, (bits, seconds) in results.items():
        print(f"{name:32} {bits:14.4f} {seconds:8.0f}")
    json.dump({
        "steps": args.steps, "code": args.code,
        "val_bits_per_byte": {name: bits for name, (bits, _) in results.items()},
        "wall_seconds": {name: seconds for name, (_, seconds) in results.items()},
    }, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
