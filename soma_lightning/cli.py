"""`soma-lightning`: LightningCLI's fit/validate/test/predict, plus `inspect`."""

import json
import sys
from glob import glob
from pathlib import Path

import jsonargparse
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, LightningArgumentParser
from lightning.pytorch.loggers import CSVLogger

from soma_lightning.checkpoint_io import AtomicCheckpointIO
from soma_lightning.data_modules import ByteCorpus
from soma_lightning.errors import UserError
from soma_lightning.lm import SomaLM
from soma_lightning.measure import count_parameters, forward_flops_per_token, train_flops_per_token
from soma_lightning.spec import build_model, load_spec


class SomaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "data": jsonargparse.lazy_instance(ByteCorpus),
                "trainer.logger": jsonargparse.lazy_instance(CSVLogger, save_dir="runs", name="soma"),
                "trainer.plugins": jsonargparse.lazy_instance(AtomicCheckpointIO),
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{step}",
            }
        )

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
        ByteCorpus,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},
        args=args,
    )


def inspect_spec(config: str) -> dict:
    """Parameters, FLOPs per token and block pattern of the spec in a config file, from a meta-device model
    (no weights allocated)."""
    spec = load_spec(config)
    model = build_model(spec, device="meta")
    total, active = count_parameters(model)
    layers = [[f"{norm or '-'} > {name}:{type(layer.get_submodule(name)).__name__}" for norm, name in layer.order] for layer in model.encoder.layers]
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


COMMANDS = {"inspect": inspect_main}


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
        print(f"soma-lightning: error: {message}", file=sys.stderr)
        sys.exit(2)
