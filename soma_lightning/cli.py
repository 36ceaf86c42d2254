"""`soma-lightning`: LightningCLI's fit/validate/test/predict, plus `inspect`, `export`, `score`, `graph` and `generate`."""

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import jsonargparse
from jsonargparse import Namespace
import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from soma_lightning.callbacks import NonFiniteGuard, PreemptionCheckpoint, RunInfo
from soma_lightning.callbacks.safetensors_export import full_state, is_v1, write_safetensors
from soma_lightning.checkpoint_io import AtomicCheckpointIO, atomic_write, describe_write_error
from soma_lightning.checkpoints import load_module, read_hyperparameters, refuse_url, resolve_checkpoint
from soma_lightning.generation.constraints import AllowedTokens, DeniedTokens, FactVocabulary, RegexConstraint, RepetitionPenalty
from soma_lightning.data_modules.contract import EOS
from soma_lightning.data_modules import ByteCorpus
from soma_lightning.data_modules.byte_corpus import source_files
from soma_lightning.data_modules.modalities import TokenSpace, decode_to_files
from soma_lightning.data_modules.modalities import prompt as modality_prompt
from soma_lightning.data_modules.multimodal import MultimodalCorpus, Shards, prepare_corpus
from soma_lightning.errors import TrainingStopped, UserError
from soma_lightning.generation import generate, write_trace
from soma_lightning.lm import SomaLM
from soma_lightning.measure import count_parameters, forward_flops_per_token, train_flops_per_token
from soma_lightning.nn.semantic_graph import EDGE_TYPES, build_graph
from soma_lightning.nn.semantic_state import SemanticStateEmbedding
from soma_lightning.report import write_report
from soma_lightning.safe_unpickling import restricted_unpickling
from soma_lightning.spec import SpecError, build_model, load_spec, read_yaml
from soma_lightning.v1 import V1_NUM_HEADS, WeightsError, check_device, file_size, model_from_canonical, model_size, score, size_mismatch


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
        parser.add_argument(
            "--ckpt_spec", choices=["refuse", "checkpoint"], default="refuse",
            help="when --ckpt_path was trained with other model settings than the config's: refuse, naming the keys "
            "that differ (default), or take the checkpoint's",
        )

    def before_instantiate_classes(self) -> None:
        """Keys of a config file that jsonargparse drops without a word (spec.check_config_keys), and DeepSpeed's
        two requirements, which Lightning reports only as a nested type error (deepspeed not installed) or once
        fit has started (on a CPU)."""
        from soma_lightning.spec import check_config_keys

        subcommands = self._subcommand_parsers
        top = [a.dest for a in self.parser._actions] + [f"{name}.{a.dest}" for name, p in subcommands.items() for a in p._actions]
        for configs, dests in ((self.config.get("config"), top), (self._get(self.config, "config"), [a.dest for a in subcommands[self.subcommand]._actions])):
            for config in configs or []:
                if config is not None:
                    check_config_keys(str(config), dests)
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

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path`, for every subcommand, before anything is built: a URL is refused (Lightning would
        unpickle a download with weights_only=False); `last` is the newest last.ckpt of this run name; the
        checkpoint is read weights-only and its model hyper-parameters compared with the config's. LightningCLI
        would silently replace the config's `model.*` with the checkpoint's; here they are taken only with
        `--ckpt_spec checkpoint`, otherwise a difference is refused after the model is built (`_check_ckpt`)."""
        self._ckpt_hparams = None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if config.get("weights_only") is False:
            raise UserError("--weights_only: false would let a checkpoint run code when it is loaded; soma-lightning loads checkpoints weights-only")
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            return
        refuse_url(ckpt_path, "--ckpt_path")
        if ckpt_path == "last":
            ckpt_path = str(_last_checkpoint(_run_root(config.trainer)))
            print(f"soma-lightning: --ckpt_path last: {ckpt_path}", file=sys.stderr)
        path = resolve_checkpoint(ckpt_path, "last", "--ckpt_path")
        config.ckpt_path = str(path)
        self._ckpt_hparams = read_hyperparameters(path, "--ckpt_path")
        if self._ckpt_hparams is not None and config.get("ckpt_spec") == "checkpoint":
            hparams = {k: v for k, v in self._ckpt_hparams.items() if k not in RUNTIME_HPARAMS}
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _check_ckpt(self) -> None:
        """Refuse a checkpoint whose model hyper-parameters differ from the config's, naming each key."""
        if self._ckpt_hparams is None:
            return
        ignored = RUNTIME_HPARAMS | ({"optim"} if self.subcommand != "fit" else set())
        mine = _flatten({k: v for k, v in self.model.hparams.items() if k not in ignored}, "model")
        theirs = _flatten({k: v for k, v in self._ckpt_hparams.items() if k not in ignored}, "model")
        differ = [f"{key} (checkpoint {theirs.get(key, '-')}, config {mine.get(key, '-')})" for key in sorted(mine.keys() | theirs.keys()) if mine.get(key) != theirs.get(key)]
        if differ:
            ckpt = self.config_init[self.subcommand].get("ckpt_path")
            shown = "; ".join(differ[:6]) + (f"; and {len(differ) - 6} more" if len(differ) > 6 else "")
            raise UserError(
                f"--ckpt_path: {ckpt} was trained with other model settings: {shown}. Use the run's config.yaml, or pass "
                "--ckpt_spec checkpoint to take the checkpoint's values"
            )

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Every run also gets PreemptionCheckpoint, RunInfo, NonFiniteGuard (unless the spec configures its
        own) and LearningRateMonitor when it has a logger; the loggers share one version directory. Lightning
        rejects a bad strategy, accelerator or precision with a ValueError: the user's mistake in a `trainer.*`
        key."""
        trainer_config = self._get(self.config_init, "trainer")
        has_logger = trainer_config.get("logger") not in (None, False, [])
        has_guard = any(isinstance(c, NonFiniteGuard) for c in trainer_config.get("callbacks") or [])
        self.trainer_defaults["callbacks"] = [
            PreemptionCheckpoint(), RunInfo(), *([] if has_guard else [NonFiniteGuard()]),
            *([LearningRateMonitor(logging_interval="step")] if has_logger else []),
        ]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as e:
            raise UserError(f"trainer: {e}") from None
        share_run_version(trainer.loggers)
        return trainer

    def before_fit(self) -> None:
        self._check_ckpt()
        root = Path(getattr(self.trainer.logger, "root_dir", None) or self.trainer.default_root_dir)
        for partial in root.glob("*/checkpoints/*.ckpt.tmp"):
            shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
            print(f"soma-lightning: removed {partial}, left by an interrupted save", file=sys.stderr)

    def after_fit(self) -> None:
        """A run stopped by NonFiniteGuard ends with its one-line report and a non-zero exit."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, NonFiniteGuard) and callback.action == "stop" and callback.last_report is not None:
                raise TrainingStopped(f"training stopped: {callback.last_report['message']}")

    before_validate = before_test = before_predict = _check_ckpt


# Settings of how a model runs, not what it is: they may differ between a checkpoint and the run that loads it.
RUNTIME_HPARAMS = {"compile", "activation_checkpointing", "init_weights"}


def _flatten(value: object, prefix: str) -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}.{key}").items()}
    return {prefix: list(value) if isinstance(value, tuple) else value}


def _run_root(trainer: Namespace) -> Path:
    """runs/NAME of a run's config: its first logger's save_dir/name (as the loggers lay out version_N), else
    Lightning's default_root_dir/lightning_logs."""
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init = logger.get("init_args") if isinstance(logger, (dict, Namespace)) else None
        if init is not None and init.get("save_dir") is not None:
            return Path(init["save_dir"]) / (init.get("name") or "lightning_logs")
    return Path(trainer.get("default_root_dir") or ".") / "lightning_logs"


def _last_checkpoint(root: Path) -> Path:
    candidates = list(root.glob("*/checkpoints/last.ckpt"))
    if not candidates:
        raise UserError(f"--ckpt_path last: no last.ckpt under {root}/*/checkpoints/")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def cli_main(args: list[str] | None = None) -> None:
    with restricted_unpickling():
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


def _load_run(ckpt: str, which: str) -> tuple[Path, SomaLM]:
    path = resolve_checkpoint(ckpt, which)
    return path, load_module(path)


def export_checkpoint(ckpt: str, out: str, which: str = "best", layout: str = "auto", strict_v1: bool = False) -> dict:
    """Write a run's weights as one safetensors file: a .ckpt, or a sharded checkpoint folder (FSDP2, FSDP1
    or DeepSpeed ZeRO) consolidated. `layout`: canonical (SOMA V1's layout, 389 keys for the full model,
    F32), state_dict (the model's own tensors with the resolved spec in the metadata), auto (canonical for a
    V1-shaped model). `strict_v1`: refuse a model that is not the registered V1 size, the only one the
    network loads."""
    if strict_v1 and layout == "state_dict":
        raise UserError("--strict-v1: checks the canonical V1 layout, but --layout is state_dict")
    target = Path(out)
    if target.is_dir():
        raise UserError(f"--out: {out} is a directory; expected the path of the .safetensors file to write")
    source = resolve_checkpoint(ckpt, which)
    # Of a run directory, every checkpoint is kept safe: exporting best over last.ckpt would lose last.ckpt.
    run_checkpoints = list(source.parent.glob("*.ckpt")) if Path(ckpt).is_dir() and source != Path(ckpt) else []
    for checkpoint in [source, *run_checkpoints]:
        inside = checkpoint.is_dir() and target.resolve().is_relative_to(checkpoint.resolve())
        if inside or target.resolve() == checkpoint.resolve() or (target.exists() and target.samefile(checkpoint)):
            where = f"is inside the checkpoint folder {checkpoint}" if inside else f"is the checkpoint {checkpoint}"
            raise UserError(f"--out: {out} {where} of --ckpt {ckpt}; writing there would destroy it, pick another path")
    path, module = _load_run(ckpt, which)
    if strict_v1:
        try:
            mismatch = size_mismatch(model_size(module.model))
        except WeightsError as e:
            raise UserError(f"--strict-v1: {path}: {e}") from None
        if mismatch:
            raise UserError(f"--strict-v1: {path} is {mismatch}")
    canonical = strict_v1 or layout == "canonical" or (layout == "auto" and is_v1(module.model))
    tensors = full_state(module.model)
    existed = target.is_file()
    try:
        write_safetensors(module.model, tensors, module.arch, out, canonical)
    except Exception as e:
        if (reason := describe_write_error(out, e)) is None:
            raise
        raise UserError(f"--out: {reason}; " + ("the previous file is unchanged" if existed else "nothing was written")) from None
    return {"ckpt": str(path), "out": out, "layout": "canonical" if canonical else "state_dict", "keys": len(tensors), "parameters": count_parameters(module.model)[0]}


def export_main(args: list[str]) -> None:
    parser = jsonargparse.ArgumentParser(prog="soma-lightning export", description=export_checkpoint.__doc__, exit_on_error=False)
    parser.add_argument("--ckpt", required=True, help="a .ckpt file, a sharded checkpoint folder, or a run directory (runs/NAME/version_N)")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--which", choices=["best", "last"], default="best", help="which checkpoint of a run directory")
    parser.add_argument("--layout", choices=["auto", "canonical", "state_dict"], default="auto")
    parser.add_argument("--strict-v1", action="store_true", help="refuse a model that is not the registered V1 size (d_model 2048, 24 layers, 8 heads, hidden 8192)")
    cfg = parser.parse_args(args)
    print(json.dumps(export_checkpoint(cfg.ckpt, cfg.out, cfg.which, cfg.layout, cfg.strict_v1)))


def read_data(path: str) -> bytes:
    """The bytes of a file, or of every file of a directory (sorted by path) concatenated; none is an error."""
    data = b"".join(f.read_bytes() for f in source_files(path, "--data"))
    if not data:
        raise UserError(f"--data: no data to score (0 bytes in {path}); the canonical scorer fails with EmptyData")
    return data


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
    parser.add_argument("--strict-v1", action="store_true", help="refuse weights that are not the registered V1 size (default: a warning)")
    cfg = parser.parse_args(args)
    if cfg.batch_size <= 0:
        raise UserError(f"--batch-size: expected a positive number of sequences per batch, got {cfg.batch_size}")
    device = check_device(cfg.device)
    if cfg.embedding_out:
        out = Path(cfg.embedding_out)
        if out.is_dir():
            raise UserError(f"--embedding-out: {out} is a directory; expected the path of a .npy file")
        if not out.parent.is_dir():
            raise UserError(f"--embedding-out: the folder {out.parent} does not exist; create it first")
    if mismatch := size_mismatch(file_size(cfg.weights, cfg.num_heads)):
        if cfg.strict_v1:
            raise UserError(f"--strict-v1: {cfg.weights} is {mismatch}")
        print(f"soma-lightning: warning: {cfg.weights} is {mismatch}; scoring it anyway (--strict-v1 refuses)", file=sys.stderr)
    data = read_data(cfg.data)
    model = model_from_canonical(cfg.weights, cfg.num_heads, str(device), cfg.attention)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    result, embedding = score(model, data, cfg.seed, cfg.batch_size, autocast_dtype=dtype)
    if cfg.embedding_out:
        try:
            np.save(cfg.embedding_out, embedding.numpy())
        except OSError as e:
            raise UserError(f"--embedding-out: {describe_write_error(cfg.embedding_out, e) or e}") from None
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
    parser.add_argument("--regex", default=None, help="the generated text must match this pattern (see soma_lightning/generation/regex.py for the subset)")
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
    check_device(cfg.device)
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
