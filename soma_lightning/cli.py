"""`soma-lightning`: LightningCLI's fit/validate/test/predict, plus `inspect`, `export`, `score`, `graph` and `generate`."""

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from glob import glob
from pathlib import Path
from typing import Optional

import jsonargparse
import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from soma_lightning.callbacks import PreemptionCheckpoint, RunInfo
from soma_lightning.callbacks.safetensors_export import full_state, is_v1, write_safetensors
from soma_lightning.checkpoint_io import AtomicCheckpointIO, atomic_write
from soma_lightning.constraints import AllowedTokens, DeniedTokens, FactVocabulary, RegexConstraint, RepetitionPenalty
from soma_lightning.data_modules.contract import EOS
from soma_lightning.data_modules import ByteCorpus
from soma_lightning.data_modules.byte_corpus import source_files
from soma_lightning.data_modules.modalities import TokenSpace, decode_to_files
from soma_lightning.data_modules.modalities import prompt as modality_prompt
from soma_lightning.data_modules.multimodal import MultimodalCorpus, Shards, prepare_corpus
from soma_lightning.errors import UserError
from soma_lightning.generate import generate, write_trace
from soma_lightning.lm import SomaLM
from soma_lightning.measure import count_parameters, forward_flops_per_token, train_flops_per_token
from soma_lightning.nn.semantic_graph import EDGE_TYPES, build_graph
from soma_lightning.nn.semantic_state import SemanticStateEmbedding
from soma_lightning.report import write_report
from soma_lightning.spec import SpecError, build_model, load_spec, read_yaml
from soma_lightning.v1 import V1_NUM_HEADS, model_from_canonical, score


DESCRIPTION = (
    "soma-lightning: train, validate, test and predict with a spec (LightningCLI subcommands below). "
    "Also: `soma-lightning inspect --config SPEC` (parameters, FLOPs, block pattern), "
    "`soma-lightning export --ckpt RUN --out FILE` (one safetensors file from a checkpoint, sharded ones "
    "consolidated; SOMA V1 in its canonical layout), `soma-lightning score --weights FILE --data PATH` (the on-chain loss "
    "of canonical V1 weights), `soma-lightning graph --ckpt RUN --text TEXT` (the semantic graph a SOSM model builds), "
    "`soma-lightning generate --ckpt RUN --prompt TEXT` (sampling, constraints, provenance traces), "
    "`soma-lightning report RUN_DIR` (plots and a markdown summary of a run), `soma-lightning prepare --config SPEC "
    "[--out DIR]` (multimodal shards) and `soma-lightning decode --data DIR --tokens FILE --out DIR` (ids -> text, PNG, "
    "WAV); each has --help."
)


class LogConfigCallback(SaveConfigCallback):
    """Saves config.yaml in the run directory (as LightningCLI does) and logs the resolved config, nested, as the
    run's hyper-parameters to every logger: hparams.yaml for CSV, the HParams tab for TensorBoard, the run config
    for W&B."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


def share_run_version(loggers: list[Logger]) -> None:
    """CSV and TensorBoard loggers of the same save_dir/name would each take the next free version_N when first
    used, and the second would see the first's new directory: give them all the first one's version, so one run
    writes one runs/NAME/version_N."""
    dirs = [logger for logger in loggers if isinstance(logger, (CSVLogger, TensorBoardLogger))]
    for logger in dirs[1:]:
        if logger._version is None and logger.root_dir == dirs[0].root_dir:
            logger._version = dirs[0].version


class SomaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "data": jsonargparse.lazy_instance(ByteCorpus),
                "trainer.logger": [
                    {"class_path": f"lightning.pytorch.loggers.{logger.__name__}", "init_args": {"save_dir": "runs", "name": "soma"}}
                    for logger in (CSVLogger, TensorBoardLogger)
                ],
                "trainer.plugins": jsonargparse.lazy_instance(AtomicCheckpointIO),
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{step}",
            }
        )

    def before_instantiate_classes(self) -> None:
        """DeepSpeed's two requirements, which Lightning reports only as a nested type error (deepspeed not
        installed) or once fit has started (on a CPU)."""
        trainer = self._get(self.config, "trainer")
        strategy = trainer.get("strategy")
        name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "") or ""
        if "deepspeed" not in name.lower():
            return
        accelerator = trainer.get("accelerator")
        if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
            raise UserError(f"trainer.strategy: {name} runs on CUDA GPUs only, but trainer.accelerator is {accelerator} and resolves to the CPU")
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise UserError(f"trainer.strategy: {name} needs the deepspeed extra ({e}); pip install 'soma-lightning[deepspeed]'") from None

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Every run also gets PreemptionCheckpoint, RunInfo, and LearningRateMonitor when it has a logger (not
        configurable, so never duplicated by a spec); the loggers share one version directory. Lightning rejects
        a bad strategy, accelerator or precision with a ValueError: the user's mistake in a `trainer.*` key."""
        has_logger = self._get(self.config_init, "trainer").get("logger") not in (None, False, [])
        self.trainer_defaults["callbacks"] = [
            PreemptionCheckpoint(), RunInfo(), *([LearningRateMonitor(logging_interval="step")] if has_logger else []),
        ]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as e:
            raise UserError(f"trainer: {e}") from None
        share_run_version(trainer.loggers)
        return trainer

    def before_fit(self) -> None:
        """`--ckpt_path last`: the newest last.ckpt of any earlier version of this run's logger directory."""
        config = self.config_init["fit"]
        if config.get("ckpt_path") != "last":
            return
        root = getattr(self.trainer.logger, "root_dir", None) or self.trainer.default_root_dir
        candidates = glob(str(Path(root) / "*" / "checkpoints" / "last.ckpt"))
        if not candidates:
            raise UserError(f"--ckpt_path last: no last.ckpt under {root}/*/checkpoints/ to resume from")
        config["ckpt_path"] = max(candidates, key=lambda p: Path(p).stat().st_mtime)
        print(f"soma-lightning: resuming from {config['ckpt_path']}", file=sys.stderr)


def cli_main(args: list[str] | None = None) -> None:
    SomaCLI(
        SomaLM,
        L.LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, "description": DESCRIPTION},
        args=args,
    )


def inspect_spec(config: str) -> dict:
    """Parameters, FLOPs per token and block pattern of the spec in a config file, from a meta-device model
    (no weights allocated)."""
    spec = load_spec(config)
    model = build_model(spec, device="meta")
    total, active = count_parameters(model)
    def describe(block) -> list[str]:
        return [f"{norm or '-'} > {name}:{type(block.get_submodule(name)).__name__}" for norm, name in block.order]

    layers = [describe(layer) for layer in model.encoder.layers]
    mtp = [describe(depth.block) for depth in model.mtp.depths] if model.mtp is not None else []
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
        "layers": layers,
        "sequential_mtp": mtp,
    }


def _print_inspection(info: dict) -> None:
    print(f"spec              {info['config']}")
    print(f"parameters        {info['total_parameters']:,} total, {info['active_parameters']:,} active per token")
    print(f"FLOPs per token   {info['forward_flops_per_token'] / 1e9:.4f} GFLOP forward, {info['train_flops_per_token'] / 1e9:.4f} GFLOP train (seq_len {info['seq_len']})")
    print(f"shape             d_model {info['d_model']}, {info['n_layers']} layers, vocab {info['vocab_size']}")
    runs: list[tuple[list[str], int]] = []
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


def inspect_main(args: list[str]) -> None:
    parser = jsonargparse.ArgumentParser(prog="soma-lightning inspect", description=inspect_spec.__doc__, exit_on_error=False)
    parser.add_argument("--config", required=True, help="a config file with model.arch")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    cfg = parser.parse_args(args)
    info = inspect_spec(cfg.config)
    if cfg.json:
        print(json.dumps(info))
    else:
        _print_inspection(info)


def _checkpoint_of(path: str, which: str) -> Path:
    """A checkpoint (a .ckpt file, or a sharded checkpoint folder), or the best / last checkpoint of a run
    directory (runs/NAME/version_N)."""
    p = Path(path)
    if p.is_file() or (p / SHARDED_METADATA).is_file() or (p / DEEPSPEED_LATEST).is_file():
        return p
    if not p.is_dir():
        raise UserError(f"--ckpt: {path!r} is neither a checkpoint nor a run directory")
    folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    pattern = "last.ckpt" if which == "last" else "best-*.ckpt"
    found = sorted(folder.glob(pattern), key=lambda f: f.stat().st_mtime)
    if not found:
        raise UserError(f"--ckpt: no {pattern} in {folder}")
    return found[-1]


SHARDED_METADATA = "meta.pt"  # what Lightning's FSDP and ModelParallel strategies write beside the shards
DEEPSPEED_LATEST = "latest"  # what DeepSpeed writes into its checkpoint folders


def _load_sharded(path: Path) -> SomaLM:
    """A SomaLM holding the full weights of a sharded (torch.distributed.checkpoint) checkpoint folder,
    read in this one process. Lightning's ModelParallelStrategy (FSDP2) stores the weights under
    "state_dict", its FSDPStrategy (FSDP1) under "model"."""
    import torch.distributed.checkpoint as dcp

    meta = torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=False)
    module = SomaLM(**(meta["hyper_parameters"] | {"init_weights": None}))
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    top = "model" if any(key.startswith("model.model.") for key in stored) else "state_dict"
    state = {top: module.state_dict()}
    dcp.load(state, checkpoint_id=path)
    module.load_state_dict(state[top])
    return module


def _load_deepspeed(path: Path) -> SomaLM:
    """A SomaLM holding the full float32 weights of a DeepSpeed ZeRO checkpoint folder, consolidated by
    Lightning's converter (needs the `deepspeed` extra)."""
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as e:
        raise UserError(f"--ckpt: {path} is a DeepSpeed checkpoint; reading it needs the deepspeed extra ({e})") from None
    with tempfile.TemporaryDirectory() as tmp:
        consolidated = Path(tmp) / "consolidated.ckpt"
        convert_zero_checkpoint_to_fp32_state_dict(path, consolidated)
        return SomaLM.load_from_checkpoint(consolidated, map_location="cpu", init_weights=None)


def _load_run(ckpt: str, which: str) -> tuple[Path, SomaLM]:
    path = _checkpoint_of(ckpt, which)
    try:
        if (path / DEEPSPEED_LATEST).is_file():
            return path, _load_deepspeed(path)
        if path.is_dir():
            return path, _load_sharded(path)
        return path, SomaLM.load_from_checkpoint(path, map_location="cpu", init_weights=None)
    except (KeyError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise UserError(f"--ckpt: {path} is not a soma-lightning checkpoint ({type(e).__name__}: {e})") from None


def export_checkpoint(ckpt: str, out: str, which: str = "best", layout: str = "auto") -> dict:
    """Write a run's weights as one safetensors file: a .ckpt, or a sharded checkpoint folder (FSDP2, FSDP1
    or DeepSpeed ZeRO) consolidated. `layout`: canonical (SOMA V1's layout, 389 keys for the full model,
    F32), state_dict (the model's own tensors with the resolved spec in the metadata), auto (canonical for a
    V1-shaped model)."""
    path, module = _load_run(ckpt, which)
    canonical = layout == "canonical" or (layout == "auto" and is_v1(module.model))
    tensors = full_state(module.model)
    write_safetensors(module.model, tensors, module.arch, out, canonical)
    return {"ckpt": str(path), "out": out, "layout": "canonical" if canonical else "state_dict", "keys": len(tensors), "parameters": count_parameters(module.model)[0]}


def export_main(args: list[str]) -> None:
    parser = jsonargparse.ArgumentParser(prog="soma-lightning export", description=export_checkpoint.__doc__, exit_on_error=False)
    parser.add_argument("--ckpt", required=True, help="a .ckpt file, a sharded checkpoint folder, or a run directory (runs/NAME/version_N)")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--which", choices=["best", "last"], default="best", help="which checkpoint of a run directory")
    parser.add_argument("--layout", choices=["auto", "canonical", "state_dict"], default="auto")
    cfg = parser.parse_args(args)
    print(json.dumps(export_checkpoint(cfg.ckpt, cfg.out, cfg.which, cfg.layout)))


def read_data(path: str) -> bytes:
    """The bytes of a file, or of every file of a directory (sorted by path) concatenated."""
    return b"".join(f.read_bytes() for f in source_files(path, "--data"))


def score_main(args: list[str]) -> None:
    parser = jsonargparse.ArgumentParser(
        prog="soma-lightning score",
        description="The on-chain loss of canonical V1 weights on data, as the network's Rust scorer computes it.",
        exit_on_error=False,
    )
    parser.add_argument("--weights", required=True, help="canonical V1 safetensors; dimensions are read from its shapes")
    parser.add_argument("--data", required=True, help="a file, or a directory whose files are concatenated in path order")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; batch b uses seed + b")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-heads", type=int, default=V1_NUM_HEADS, help="attention heads (shapes cannot tell)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16: autocast")
    parser.add_argument("--attention", choices=["reference", "sdpa"], default="reference", help="reference: plain softmax, the reference's arithmetic; sdpa: fused kernels")
    parser.add_argument("--embedding-out", default=None, help="save the embedding vector here (.npy)")
    cfg = parser.parse_args(args)
    model = model_from_canonical(cfg.weights, cfg.num_heads, cfg.device, cfg.attention)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    result, embedding = score(model, read_data(cfg.data), cfg.seed, cfg.batch_size, autocast_dtype=dtype)
    if cfg.embedding_out:
        np.save(cfg.embedding_out, embedding.numpy())
    print(json.dumps(asdict(result)))


def semantic_graph_of(ckpt: str, text: str, which: str = "last") -> dict:
    """The semantic graph a SOSM checkpoint builds for the bytes of `text`: for each position its edges (key
    position, byte, edge type) and, for semantic edges, each block's weighted cosine in the similarity."""
    path, module = _load_run(ckpt, which)
    embedding = module.model.embedding
    if not isinstance(embedding, SemanticStateEmbedding):
        raise UserError(f"--ckpt: {path} is not a SOSM model (its token embedding is {type(embedding).__name__}, not semantic_state)")
    data = text.encode()
    if not data:
        raise UserError("--text: expected some text, got an empty string")
    with torch.no_grad():
        _, mu = embedding.embed(torch.tensor([list(data)]))
        graph = build_graph(mu, embedding.graph)
    blocks = list(embedding.graph.blocks)
    char = lambda i: data[i : i + 1].decode("latin-1")  # noqa: E731
    positions = []
    for i in range(len(data)):
        edges = []
        for j, kind, shares in zip(graph.neighbors[0, i].tolist(), graph.edge_type[0, i].tolist(), graph.provenance[0, i].tolist()):
            if j < 0:
                continue
            edge = {"key": j, "byte": char(j), "type": EDGE_TYPES[kind]}
            if EDGE_TYPES[kind] == "semantic":
                edge["blocks"] = {b: round(s, 4) for b, s in zip(blocks, shares)}
            edges.append(edge)
        positions.append({"position": i, "byte": char(i), "edges": edges})
    return {"ckpt": str(path), "blocks": blocks, "positions": positions}


def graph_main(args: list[str]) -> None:
    parser = jsonargparse.ArgumentParser(prog="soma-lightning graph", description=semantic_graph_of.__doc__, exit_on_error=False)
    parser.add_argument("--ckpt", required=True, help="a .ckpt file, or a run directory (runs/NAME/version_N)")
    parser.add_argument("--text", required=True, help="the text whose graph to show")
    parser.add_argument("--which", choices=["best", "last"], default="last", help="which checkpoint of a run directory")
    parser.add_argument("--json", default=None, help="write the graph as JSON to this file instead of printing it")
    cfg = parser.parse_args(args)
    info = semantic_graph_of(cfg.ckpt, cfg.text, cfg.which)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(info, indent=1))
        return
    for p in info["positions"]:
        edges = [
            f"{e['key']} {e['byte']!r} {e['type']}" + (" (" + " ".join(f"{b} {s:+.2f}" for b, s in e["blocks"].items()) + ")" if "blocks" in e else "")
            for e in p["edges"]
        ]
        print(f"{p['position']:5d} {p['byte']!r:>6} <- " + "; ".join(edges))


def report_main(args: list[str]) -> None:
    parser = jsonargparse.ArgumentParser(prog="soma-lightning report", description=write_report.__doc__, exit_on_error=False)
    parser.add_argument("run_dir", help="a run directory, runs/NAME/version_N")
    parser.add_argument("--out", default=None, help="where to write the report (default RUN_DIR/report)")
    cfg = parser.parse_args(args)
    print(json.dumps(write_report(cfg.run_dir, cfg.out)))


def multimodal_corpus(config: str, **overrides) -> MultimodalCorpus:
    """The MultimodalCorpus of a spec's data section, with some init args overridden."""
    data = read_yaml(config).get("data") or {}
    if not str(data.get("class_path", "")).endswith("MultimodalCorpus"):
        raise SpecError(f"{config}: data.class_path: prepare needs soma_lightning.data_modules.MultimodalCorpus, got {data.get('class_path')!r}")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MultimodalCorpus, "data")
    try:
        return parser.instantiate_classes(parser.parse_object({"data": dict(data.get("init_args") or {}) | overrides})).data
    except jsonargparse.ArgumentError as e:
        raise SpecError(f"{config}: data.init_args: {' '.join(str(e).split())}") from None


def prepare_from_spec(config: str, out: str | None = None) -> dict:
    """Tokenise the sources of a spec whose data module is MultimodalCorpus into memory-mapped shards (in
    `out`, default data.init_args.path), in the token space of its model.arch.vocab_ranges."""
    spec = load_spec(config)
    return prepare_corpus(multimodal_corpus(config, **({"path": out} if out else {})), spec.vocab_ranges, out)


def prepare_main(args: list[str]) -> None:
    parser = jsonargparse.ArgumentParser(prog="soma-lightning prepare", description=prepare_from_spec.__doc__, exit_on_error=False)
    parser.add_argument("--config", required=True, help="a spec with model.arch.vocab_ranges and data: MultimodalCorpus")
    parser.add_argument("--out", default=None, help="the shard directory (default: data.init_args.path)")
    cfg = parser.parse_args(args)
    index = prepare_from_spec(cfg.config, cfg.out)
    print(f"{'source':<16} {'kind':<17} {'train docs':>10} {'train tokens':>13} {'val docs':>9} {'val tokens':>11} {'skipped':>8}")
    for s in index["sources"]:
        train, val = s["shards"].get("train", {}), s["shards"].get("val", {})
        print(f"{s['name']:<16} {s['kind']:<17} {train.get('documents', 0):>10,} {train.get('tokens', 0):>13,} {val.get('documents', 0):>9,} {val.get('tokens', 0):>11,} {s['skipped']:>8}")
    for skip in index["skipped"]:
        print(f"skipped ({skip['source']}): {skip['reason']}")


def decode_main(args: list[str]) -> None:
    parser = jsonargparse.ArgumentParser(
        prog="soma-lightning decode",
        description="Write the text, code, image and audio segments of a token sequence as .txt, PNG and WAV files, "
        "with the tokenizers of a prepared corpus (its index.json and image codebook).",
        exit_on_error=False,
    )
    parser.add_argument("--data", required=True, help="a directory written by `soma-lightning prepare`")
    parser.add_argument("--tokens", default=None, help="ids to decode: a .npy array, or a text file of integers (whitespace or comma separated)")
    parser.add_argument("--document", type=int, default=None, help="instead: decode document N of the prepared corpus (documents.npy order)")
    parser.add_argument("--out", required=True, help="directory for the files")
    cfg = parser.parse_args(args)
    shards = Shards.open(cfg.data, "--data")
    if (cfg.tokens is None) == (cfg.document is None):
        raise UserError("decode: give exactly one of --tokens FILE and --document N")
    if cfg.document is not None:
        n = len(shards.documents())
        if not 0 <= cfg.document < n:
            raise UserError(f"--document: {cfg.document} is outside the corpus's {n} documents")
        tokens = shards.document(cfg.document)
    else:
        try:
            tokens = np.load(cfg.tokens) if cfg.tokens.endswith(".npy") else np.array(Path(cfg.tokens).read_text().replace(",", " ").split(), dtype=np.int64)
        except (OSError, ValueError) as e:
            raise UserError(f"--tokens: cannot read {cfg.tokens} as token ids ({e})") from None
    written = decode_to_files(np.asarray(tokens, dtype=np.int64).reshape(-1), shards.space, shards.image, shards.audio, Path(cfg.out))
    print(json.dumps({"tokens": int(np.size(tokens)), "files": [str(p) for p in written]}))


def generate_main(args: list[str]) -> None:
    parser = jsonargparse.ArgumentParser(
        prog="soma-lightning generate",
        description="Continue a prompt (its UTF-8 bytes) with a checkpoint's model; prints the generated text, and a summary line on stderr.",
        exit_on_error=False,
    )
    parser.add_argument("--ckpt", required=True, help="a .ckpt file, or a run directory (runs/NAME/version_N)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--which", choices=["best", "last"], default="last", help="which checkpoint of a run directory")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=Optional[int], default=None)
    parser.add_argument("--top-p", type=Optional[float], default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allowed-bytes", default=None, help="only these bytes (and EOS) may be emitted")
    parser.add_argument("--denied-bytes", default=None, help="these bytes may not be emitted")
    parser.add_argument("--facts", default=None, help="a file of fact strings (one per line): words must come from them or the function words")
    parser.add_argument("--regex", default=None, help="the generated text must match this pattern (see soma_lightning/constraints.py for the subset)")
    parser.add_argument("--repetition-penalty", type=Optional[float], default=None)
    parser.add_argument("--trace", default=None, help="write one JSON line per emitted token: probability, constraint decisions, provenance")
    parser.add_argument("--speculative", action="store_true", help="draft with the model's MTP heads, verify with the main head (greedy)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every token (the reference)")
    parser.add_argument(
        "--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
        help="replay the cached one-token step as a CUDA graph; default: on CUDA for models that support it (mha/gqa, no MoE)",
    )
    parser.add_argument(
        "--modality", choices=["text", "image", "audio"], default="text",
        help="image/audio: ask a model trained on a multimodal corpus for an image or clip of --prompt (a label or transcript)",
    )
    parser.add_argument("--tokens-out", default=None, help="also write the prompt and generated ids as .npy (for `soma-lightning decode --tokens`)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    cfg = parser.parse_args(args)
    _, module = _load_run(cfg.ckpt, cfg.which)
    ranges = module.arch.vocab_ranges
    if cfg.modality == "text":
        prompt = list(cfg.prompt.encode())
    elif ranges is None:
        raise UserError(f"--modality: {cfg.modality} needs a model with a token space (model.arch.vocab_ranges); {cfg.ckpt} has none")
    else:
        prompt = modality_prompt(TokenSpace(ranges), cfg.prompt, cfg.modality).tolist()
    processors = []
    if cfg.allowed_bytes is not None:
        processors.append(AllowedTokens(list(cfg.allowed_bytes.encode()) + [EOS]))
    if cfg.denied_bytes is not None:
        processors.append(DeniedTokens(list(cfg.denied_bytes.encode())))
    if cfg.facts is not None:
        path = Path(cfg.facts)
        if not path.is_file():
            raise UserError(f"--facts: {cfg.facts!r} is not a file")
        processors.append(FactVocabulary([line for line in path.read_text().splitlines() if line.strip()]))
    if cfg.regex is not None:
        processors.append(RegexConstraint(cfg.regex))
    if cfg.repetition_penalty is not None:
        processors.append(RepetitionPenalty(cfg.repetition_penalty))
    result = generate(
        module.model.to(cfg.device), prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed,
        processors, use_cache=not cfg.no_cache, trace=cfg.trace is not None, speculative=cfg.speculative, cuda_graph=cfg.cuda_graph,
        vocab_ranges=ranges,
    )
    if cfg.trace is not None:
        write_trace(cfg.trace, result.trace)
    if cfg.tokens_out is not None:
        ids = np.array(prompt + result.tokens[0], dtype=np.int64)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, ids)

        atomic_write(Path(cfg.tokens_out), write)
    print(result.texts[0])
    summary = f"soma-lightning: {len(result.tokens[0])} tokens, stop: {result.stop_reasons[0]}, {result.forward_passes} forward passes"
    if cfg.speculative:
        summary += f", {result.accepted}/{result.drafted} drafts accepted"
    print(summary, file=sys.stderr)


COMMANDS = {
    "inspect": inspect_main, "export": export_main, "score": score_main, "graph": graph_main, "generate": generate_main,
    "report": report_main, "prepare": prepare_main, "decode": decode_main,
}


def _user_error(e: BaseException) -> BaseException | None:
    """The user's mistake behind an exception: jsonargparse wraps errors raised while instantiating classes."""
    while e is not None:
        if isinstance(e, (UserError, jsonargparse.ArgumentError)):
            return e
        e = e.__cause__ or e.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
        else:
            cli_main(argv)
    except Exception as e:
        cause = _user_error(e)
        if cause is None:
            raise
        message = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
        configs = [value for flag, value in zip(args, args[1:]) if flag in ("--config", "-c")]
        if isinstance(cause, SpecError) and configs and not message.startswith(tuple(configs)):
            message += f" (in {' + '.join(configs)})"
        print(f"soma-lightning: error: {message}", file=sys.stderr)
        sys.exit(2)
