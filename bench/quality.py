"""Quality at equal steps, on real data, both arms of each comparison in one run (CPU is enough):

1. identity embeddings (hashed 2/3/4-grams) off vs on: specs/quickstart.yaml on tiny Shakespeare;
2. structural attention bias off vs on: a small GQA code model on the CPython standard library (the
   top-level modules of this interpreter's stdlib), documents joined by EOS, document-aware masks;
3. SOSM vs the dense causal model at (nearly) equal parameters: specs/quickstart.yaml with its token table
   and attention replaced by sosm_tiny.yaml's semantic state and graph attention, on tiny Shakespeare and
   on the stdlib code;
4. why specs/gpt5_moe.yaml learns slower than specs/hybrid_small.yaml: both scaled to 4 layers of d_model 128 on
   the stdlib code, with their optimizer settings (batches of 8); the gpt5 arm alone and with one ingredient changed each;
5. SOSM options off vs on (sosm_options): specs/sosm_tiny.yaml at --sosm_width and --sosm_seq_len (sosm_small),
   alone and with one option on each (SOSM_OPTIONS, or any spec key given by --option), on tiny Shakespeare and
   the --code corpus, at equal steps, tokens and validation batches (the first --val_batches of each corpus's
   validation split, the same for every arm and seed), each seed of --seeds; prints each arm's val bits/byte
   per seed, its training tokens/s (the Throughput callback's, validation and the first step left out) and a
   markdown table of the differences from each arm's reference (off, or moe_top_k for the other routings).

    python bench/quality.py --out quality.json [--comparisons identity,structure,sosm,moe_ablation,sosm_options]
    python bench/quality.py --comparisons sosm_options --steps 300 --sosm_options memory_attention,expert_choice \\
        --option 'my_arm:blocks.layer.0.mixer.some_key=true'

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
from soma_lightning.spec import build_model

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


def _alternate(arch: dict, sublayer: int, kind: str, component: dict) -> dict:
    """Every second layer with sublayer `sublayer`'s `kind` replaced by `component`."""
    arch["blocks"]["other"] = json.loads(json.dumps(arch["blocks"]["layer"]))
    arch["blocks"]["other"][sublayer][kind] = component
    arch["pattern"] = ["layer", "other"]
    return arch


def _moe(arch: dict, **moe) -> dict:
    """The FFN as 4 experts (the moe FFN's gated form) of a quarter of its hidden width, top-1 unless `moe` says otherwise."""
    hidden = arch["blocks"]["layer"][1]["ffn"]["hidden_dim"] // 4
    arch["blocks"]["layer"][1]["ffn"] = {"type": "moe", "hidden_dim": hidden, "num_experts": 4, "top_k": 1, "routing_chunk": 32, **moe}
    return arch


def _mixer(arch: dict, **keys) -> dict:
    arch["blocks"]["layer"][0]["mixer"] |= keys
    return arch


def _embedding(arch: dict, **keys) -> dict:
    arch["token_embedding"] |= keys
    return arch


def sosm_small(spec: str, d_model: int, seq_len: int) -> dict:
    """The config of specs/sosm_tiny.yaml or specs/sosm_hybrid_tiny.yaml at width d_model (4 heads, FFN 4 x
    d_model, Gated DeltaNet heads of d_model / 4) and sequence length seq_len; its graph settings as they are."""
    config = yaml.safe_load(open(spec))
    arch = config["model"]["arch"]
    arch |= {"d_model": d_model, "max_seq_len": seq_len}
    for attention, ffn in arch["blocks"].values():
        ffn["ffn"]["hidden_dim"] = 4 * d_model
        if attention["mixer"]["type"] == "gated_deltanet":
            attention["mixer"]["head_dim"] = d_model // 4
    config["data"]["init_args"] |= {"seq_len": seq_len, "val_seq_len": seq_len}
    return config


# Each option turns one thing on in the SOSM model of sosm_small(specs/sosm_tiny.yaml): arch -> arch.
SOSM_OPTIONS = {
    "differential": lambda arch: _mixer(arch, differential=True),
    "graph_rope": lambda arch: _mixer(arch, rope_positions="graph"),
    "graph_rope_both": lambda arch: _mixer(arch, rope_positions="both"),
    "landmarks": lambda arch: _mixer(arch, landmark_every=16),
    "edge_gate": lambda arch: _embedding(arch, edge_gate="learned"),
    "block_groups": lambda arch: _embedding(arch, block_groups=[["I", "D"], ["R1", "R2", "K"]]),
    "low_rank": lambda arch: arch | {"low_rank": {"rank": arch["d_model"] // 4, "include": ["encoder.layers.*.attention.*"]}},
    "memory_attention": lambda arch: _alternate(arch, 0, "mixer", {"type": "memory_attention", "num_heads": 4, "chunk_size": 32, "top_k": 16}),
    "moe_top_k": lambda arch: _moe(arch, routing="top_k"),
    "expert_choice": lambda arch: _moe(arch, routing="expert_choice"),
    "soft_moe": lambda arch: _moe(arch, routing="soft"),
    "sosm_hybrid": lambda arch: sosm_small("specs/sosm_hybrid_tiny.yaml", arch["d_model"], arch["max_seq_len"])["model"]["arch"],
}
# The arm an option is compared with; "off" when not named here.
SOSM_REFERENCE = {"expert_choice": "moe_top_k", "soft_moe": "moe_top_k"}


def set_key(arch: dict, path: str, value: object) -> dict:
    """arch with the dotted `path` (list indices as numbers: blocks.layer.0.mixer.x) set to `value`."""
    *parents, last = path.split(".")
    node = arch
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[int(last) if isinstance(node, list) else last] = value
    return arch


def option(text: str):
    """--option NAME:PATH=YAML[;PATH=YAML...] -> (NAME, arch -> arch)."""
    name, _, assignments = text.partition(":")
    pairs = [a.split("=", 1) for a in assignments.split(";")]
    if not name or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected NAME:PATH=VALUE[;PATH=VALUE...], got {text!r}")

    def apply(arch: dict) -> dict:
        for path, value in pairs:
            set_key(arch, path, yaml.safe_load(value))
        return arch

    return name, apply


def _metrics(runs: Path, name: str) -> list[dict]:
    version = max((runs / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return list(csv.DictReader(open(version / "metrics.csv")))


def run(name: str, config: dict, runs: Path) -> tuple[float, float]:
    """-> (final val bits/byte, wall seconds)."""
    start = time.perf_counter()
    config["trainer"] |= {"enable_progress_bar": False, "enable_model_summary": False}
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(runs), "name": name}}
    path = Path(tempfile.mkdtemp()) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cli_main(["fit", "--config", str(path)])
    rows = [r for r in _metrics(runs, name) if r.get("val/bits_per_byte")]
    return float(rows[-1]["val/bits_per_byte"]), time.perf_counter() - start


def _noise_verdict(arm: list[float], reference: list[float]) -> str:
    """"better" / "worse" when every seed moves the same way and the mean moves by more than either arm's
    spread over its seeds; else "no measurable effect" (and "one seed" with one seed)."""
    if len(arm) < 2:
        return "one seed"
    diffs = [a - r for a, r in zip(arm, reference)]
    spread = max(max(arm) - min(arm), max(reference) - min(reference))
    mean = sum(diffs) / len(diffs)
    if all(d < 0 for d in diffs) and -mean > spread:
        return "better"
    if all(d > 0 for d in diffs) and mean > spread:
        return "worse"
    return "no measurable effect"


def sosm_options(args: argparse.Namespace, chosen: list[str], extra: list[tuple[str, object]], runs: Path) -> dict:
    """The sosm_options comparison: every arm on every corpus with every seed, at equal steps, tokens and
    validation batches. Writes args.out (as main does, under "sosm_options") after each run, so an
    interrupted run keeps what it measured."""
    corpora = {"shakespeare": {}, "stdlib": {"source": args.code, "doc_ids": True}}
    seeds = [int(x) for x in args.seeds.split(",")]
    base = sosm_small("specs/sosm_tiny.yaml", args.sosm_width, args.sosm_seq_len)
    arms = {"off": lambda arch: arch} | {name: SOSM_OPTIONS[name] for name in chosen} | dict(extra)
    data = base["data"]["init_args"]
    tokens = args.steps * data["batch_size"] * data["seq_len"]
    base["trainer"] |= {
        "max_steps": args.steps, "val_check_interval": args.steps, "limit_val_batches": args.val_batches, "num_sanity_val_steps": 0,
        "log_every_n_steps": 25, "callbacks": [{"class_path": "soma_lightning.callbacks.Throughput"}],
    }
    out = {
        "steps": args.steps, "tokens_per_arm": tokens, "batch_size": data["batch_size"], "seq_len": data["seq_len"],
        "val_batches": args.val_batches, "val_tokens": args.val_batches * data["val_batch_size"] * data["seq_len"],
        "d_model": args.sosm_width, "code": args.code, "seeds": seeds, "reference": {name: SOSM_REFERENCE.get(name, "off") for name in arms if name != "off"},
        "parameters": {}, "val_bits_per_byte": {}, "tokens_per_s": {}, "tokens_per_cpu_s": {}, "wall_seconds": {},
    }
    for corpus, source in [(c, corpora[c]) for c in args.sosm_corpora.split(",")]:
        for seed in seeds:
            for name, change in arms.items():
                config = json.loads(json.dumps(base))
                config["model"]["arch"] = arch = change(config["model"]["arch"])
                config["data"]["init_args"] |= source | {"seed": seed}
                config["seed_everything"] = seed
                out["parameters"][name] = sum(p.numel() for p in build_model(json.loads(json.dumps(arch))).parameters())
                label = f"sosm_{name}_{corpus}_seed{seed}"
                cpu = time.process_time()
                bits, seconds = run(label, config, runs)
                cpu = time.process_time() - cpu
                rates = [float(r["train/tokens_per_s"]) for r in _metrics(runs, label) if r.get("train/tokens_per_s")]
                rate = sum(rates) / len(rates) if rates else float("nan")  # logged every 25 steps
                out["val_bits_per_byte"].setdefault(corpus, {}).setdefault(name, {})[seed] = bits
                out["tokens_per_s"].setdefault(corpus, {}).setdefault(name, {})[seed] = rate
                out["tokens_per_cpu_s"].setdefault(corpus, {}).setdefault(name, {})[seed] = tokens / cpu
                out["wall_seconds"][label] = seconds
                print(f"sosm option {name:18} {corpus:12} seed {seed}: val bits/byte {bits:.4f}, {rate:,.0f} train tokens/s, "
                      f"{tokens / cpu:,.0f} tokens per CPU second, {seconds:.0f} s")
                json.dump({"sosm_options": out}, open(args.out, "w"), indent=1)
    out["table"] = sosm_options_table(out)
    print(out["table"])
    return out


def sosm_options_table(out: dict) -> str:
    """A markdown table: per corpus, each arm's mean val bits/byte (each seed's in brackets), its difference
    from its reference arm with the verdict, and its speed (means over seeds): training tokens/s of wall time and,
    in brackets, tokens per CPU second of the whole fit (setup and validation included; less sensitive to
    other processes on a shared machine)."""
    corpora = list(out["val_bits_per_byte"])
    head = "| arm | vs | parameters | " + " | ".join(f"{c} bits/byte (seeds) | {c} diff | {c} tokens/s" for c in corpora) + " |"
    lines = [head, "|" + "---|" * (3 + 3 * len(corpora))]
    for name, parameters in out["parameters"].items():
        reference = out["reference"].get(name, "")
        cells = [f"`{name}`", reference and f"`{reference}`", f"{parameters:,}"]
        for corpus in corpora:
            bits = out["val_bits_per_byte"][corpus].get(name, {})
            rate = out["tokens_per_s"][corpus].get(name, {})
            cpu_rate = out["tokens_per_cpu_s"][corpus].get(name, {})
            seeds = [bits[s] for s in sorted(bits)]
            cells.append(f"{sum(seeds) / len(seeds):.4f} ({' / '.join(f'{b:.4f}' for b in seeds)})" if seeds else "")
            ref = out["val_bits_per_byte"][corpus].get(reference, {})
            if reference and ref and sorted(ref) == sorted(bits):
                diff = sum(seeds) / len(seeds) - sum(ref.values()) / len(ref)
                cells.append(f"{diff:+.4f} {_noise_verdict(seeds, [ref[s] for s in sorted(bits)])}")
            else:
                cells.append("")
            cells.append(f"{sum(rate.values()) / len(rate):,.0f} ({sum(cpu_rate.values()) / len(cpu_rate):,.0f})" if rate else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", default=str(Path(sysconfig.get_paths()["stdlib"]) / "*.py"), help="glob of the code corpus")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--runs", default="runs/quality")
    p.add_argument("--comparisons", default="identity,structure,sosm")
    p.add_argument("--out", default="quality.json")
    p.add_argument("--sosm_options", default=",".join(SOSM_OPTIONS), help="sosm_options: the arms of SOSM_OPTIONS to run")
    p.add_argument("--option", type=option, action="append", default=[], help="sosm_options: another arm, NAME:PATH=VALUE[;...] under model.arch")
    p.add_argument("--seeds", default="0,1", help="sosm_options: the seeds of each arm")
    p.add_argument("--sosm_corpora", default="shakespeare,stdlib", help="sosm_options: tiny Shakespeare and/or the --code corpus")
    p.add_argument("--sosm_width", type=int, default=64, help="sosm_options: d_model of the models")
    p.add_argument("--sosm_seq_len", type=int, default=128, help="sosm_options: training and validation sequence length")
    p.add_argument("--val_batches", type=int, default=16, help="sosm_options: validation batches (of 16 sequences), the same for every arm")
    args = p.parse_args()
    comparisons = args.comparisons.split(",")
    runs = Path(args.runs)
    results, sosm_out = {}, {}

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

    if "sosm_options" in comparisons:
        chosen = [name for name in args.sosm_options.split(",") if name]
        if unknown := [name for name in chosen if name not in SOSM_OPTIONS]:
            p.error(f"--sosm_options: unknown {unknown}; known: {', '.join(SOSM_OPTIONS)}")
        if unknown := set(args.sosm_corpora.split(",")) - {"shakespeare", "stdlib"}:
            p.error(f"--sosm_corpora: unknown {sorted(unknown)}; known: shakespeare, stdlib")
        sosm_out = sosm_options(args, chosen, args.option, runs)

    print(f"{'arm':32} {'val bits/byte':>14} {'wall s':>8}")
    for name, (bits, seconds) in results.items():
        print(f"{name:32} {bits:14.4f} {seconds:8.0f}")
    json.dump({
        "steps": args.steps, "code": args.code,
        "val_bits_per_byte": {name: bits for name, (bits, _) in results.items()},
        "wall_seconds": {name: seconds for name, (_, seconds) in results.items()},
    } | ({"sosm_options": sosm_out} if sosm_out else {}), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
