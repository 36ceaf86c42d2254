"""`soma-lightning fit|validate|test|predict`: LightningCLI, with the run directory, checkpoint and error
handling a user of the framework expects."""

import importlib
import json
import logging
import shutil
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import jsonargparse
import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn.attention import sdpa_kernel

from soma_lightning.callbacks import NonFiniteGuard, PreemptionCheckpoint, RunInfo
from soma_lightning.callbacks.final_validation import FinalValidation
from soma_lightning.callbacks.model_summary import SpecSummary
from soma_lightning.callbacks.progress_bar import ProgressBar
from soma_lightning.callbacks.prediction_writer import PredictionWriter
from soma_lightning.checkpoint_io import AtomicCheckpointIO, atomic_write
from soma_lightning.checkpoints import RUNTIME_HPARAMS, hparams_differences, read_global_step, read_hyperparameters, refuse_url, resolve_checkpoint
from soma_lightning.cli.run_dir import continue_metrics, last_checkpoint, name_run, run_root, share_run_version, version_dir_of
from soma_lightning.config_files import check_config_keys
from soma_lightning.data_modules import ByteCorpus
from soma_lightning.errors import TrainingStopped, UserError
from soma_lightning.lm import SomaLM
from soma_lightning.nn.ops.attention.backends import SDPA_PRIORITY
from soma_lightning.parallel.mesh import ParallelDims
from soma_lightning.safe_unpickling import restricted_unpickling
from soma_lightning.strategies import FSDP2Strategy

TRAINING_COMMANDS = {
    "fit": "train a model from a spec: soma-lightning fit --config specs/quickstart.yaml",
    "validate": "the validation loss of a checkpoint (--ckpt_path), written beside it",
    "test": "the loss on data.init_args.test_source of a checkpoint, written beside it",
    "predict": "per-row losses of a checkpoint, written beside it as JSON lines",
}


class LogConfigCallback(SaveConfigCallback):
    """Saves config.yaml in the run directory (as LightningCLI does) and logs the resolved config, nested, as the
    run's hyper-parameters to every logger: hparams.yaml for CSV, the HParams tab for TensorBoard, the run config
    for W&B. Only a fit has a run directory; validate, test and predict save nothing here."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class SomaCLI(LightningCLI):
    """A fit logs to runs/NAME/version_N (CSV and TensorBoard by default; `--name` sets NAME for every logger) and
    ends with a validation; resuming with `--ckpt_path` continues the checkpoint's run directory. validate, test
    and predict create no run directory: they write their results beside the checkpoint they evaluate."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_class_arguments(ParallelDims, "parallel", help="degrees of parallelism over the devices (FSDP2Strategy): --parallel.tp 2 ...")
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
        parser.add_argument("--name", type=str | None, default=None, help="the run's name: it logs to runs/NAME/version_N (every logger, and the checkpoints)")
        parser.add_argument(
            "--ckpt_spec", choices=["refuse", "checkpoint"], default="refuse",
            help="when --ckpt_path was trained with other model settings than the config's: refuse, naming the keys "
            "that differ (default), or take the checkpoint's",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("name"):
            name_run(self.config[subcommand].trainer, self.config[subcommand].name)
        self._run_root = run_root(self.config[subcommand].trainer) if subcommand else None

    def before_instantiate_classes(self) -> None:
        """Keys of a config file that jsonargparse drops without a word (config_files.check_config_keys), and
        DeepSpeed's two requirements, which Lightning reports only as a nested type error (deepspeed not
        installed) or once fit has started (on a CPU). validate, test and predict log nowhere. ByteCorpus
        takes the model's tokenizer (`_share_tokenizer`)."""
        subcommands = self._subcommand_parsers
        top = [a.dest for a in self.parser._actions] + [f"{name}.{a.dest}" for name, p in subcommands.items() for a in p._actions]
        for configs, dests in ((self.config.get("config"), top), (self._get(self.config, "config"), [a.dest for a in subcommands[self.subcommand]._actions])):
            for config in configs or []:
                if config is not None:
                    check_config_keys(str(config), dests)
        self._share_tokenizer()
        trainer = self._get(self.config, "trainer")
        if self.subcommand != "fit":
            trainer["logger"] = False
            # The checkpoint callback saves nothing here; that its restored bookkeeping names another folder is moot.
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
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

    def _share_tokenizer(self) -> None:
        """ByteCorpus reads the model's tokens: an unset data.init_args.tokenizer (and eos_token) is set to
        model.arch's before anything is built, so that config.yaml records it; another one is refused."""
        data, arch = self._get(self.config, "data"), self._get(self.config, "model").arch
        module, _, name = getattr(data, "class_path", "").rpartition(".")
        cls = getattr(importlib.import_module(module), name, None) if module else None
        if not (isinstance(cls, type) and issubclass(cls, ByteCorpus)):
            return
        given = data.init_args
        if given.get("tokenizer") is None:
            given.tokenizer, given.eos_token = arch.tokenizer, arch.eos_token
        elif (given.tokenizer, given.eos_token) != (arch.tokenizer, arch.eos_token):
            raise UserError(
                f"data.init_args.tokenizer: {given.tokenizer} (eos_token {given.eos_token}) differs from model.arch.tokenizer {arch.tokenizer} "
                f"(eos_token {arch.eos_token}); set model.arch.tokenizer only: the data takes the model's"
            )

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path`, for every subcommand, before anything is built: a URL is refused (Lightning would
        unpickle a download with weights_only=False); `last` is the newest last.ckpt of this run name; the
        checkpoint is read weights-only and its model hyper-parameters compared with the config's. LightningCLI
        would silently replace the config's `model.*` with the checkpoint's; here they are taken only with
        `--ckpt_spec checkpoint`, otherwise a difference is refused after the model is built (`_check_ckpt`)."""
        self._ckpt_hparams, self._ckpt = None, None
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
            ckpt_path = str(last_checkpoint(run_root(config.trainer)))
            print(f"soma-lightning: --ckpt_path last: {ckpt_path}", file=sys.stderr)
        self._ckpt = resolve_checkpoint(ckpt_path, "last", "--ckpt_path")
        config.ckpt_path = str(self._ckpt)
        self._ckpt_hparams = read_hyperparameters(self._ckpt, "--ckpt_path")
        if self._ckpt_hparams is not None and config.get("ckpt_spec") == "checkpoint":
            hparams = {k: v for k, v in self._ckpt_hparams.items() if k not in RUNTIME_HPARAMS}
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _check_ckpt(self) -> None:
        """Refuse a checkpoint whose model hyper-parameters differ from the config's, naming each key."""
        if self._ckpt_hparams is None:
            return
        ignored = RUNTIME_HPARAMS | ({"optim"} if self.subcommand != "fit" else set())
        differ = hparams_differences(self._ckpt_hparams, dict(self.model.hparams), ignored)
        if differ:
            shown = "; ".join(differ[:6]) + (f"; and {len(differ) - 6} more" if len(differ) > 6 else "")
            raise UserError(
                f"--ckpt_path: {self._ckpt} was trained with other model settings: {shown}. Use the run's config.yaml, or pass "
                "--ckpt_spec checkpoint to take the checkpoint's values"
            )

    def _results_path(self, suffix: str) -> Path:
        """Where validate/test/predict write: beside the checkpoint, named after it; without one (the untrained
        model) in runs/NAME."""
        if self._ckpt is None:
            return self._run_root / f"{self.subcommand}-untrained{suffix}"
        folder = version_dir_of(self._ckpt) or (self._ckpt if self._ckpt.is_dir() else self._ckpt.parent)
        return folder / f"{self.subcommand}-{self._ckpt.stem}{suffix}"

    def _default_callbacks(self, trainer_config: dict) -> list[L.Callback]:
        """Every run gets PreemptionCheckpoint, RunInfo, NonFiniteGuard (unless the spec configures its own) and
        LearningRateMonitor when it has a logger; a fit also FinalValidation, ProgressBar and SpecSummary (unless
        switched off or configured); predict a PredictionWriter."""
        configured = trainer_config.get("callbacks") or []
        fit = self.subcommand == "fit"
        return [
            PreemptionCheckpoint(), RunInfo(),
            *([] if any(isinstance(c, NonFiniteGuard) for c in configured) else [NonFiniteGuard()]),
            *([LearningRateMonitor(logging_interval="step")] if trainer_config.get("logger") not in (None, False, []) else []),
            *([FinalValidation()] if fit else []),
            *([ProgressBar()] if fit and trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBarBase) for c in configured) else []),
            *([SpecSummary()] if fit and trainer_config.get("enable_model_summary") is not False else []),
            *([PredictionWriter(self._results_path(".jsonl"))] if self.subcommand == "predict" else []),
        ]

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """After the model is built, a checkpoint of other model settings is refused (`_check_ckpt`). The
        loggers share one version directory: a resumed run's own. Lightning rejects a bad strategy,
        accelerator or precision with a ValueError: the user's mistake in a `trainer.*` key."""
        self._check_ckpt()
        trainer_config = self._get(self.config_init, "trainer")
        self.trainer_defaults["callbacks"] = self._default_callbacks(trainer_config)
        if any(isinstance(c, SpecSummary) for c in self.trainer_defaults["callbacks"]):
            trainer_config["enable_model_summary"] = False  # SpecSummary replaces Lightning's default summary
        self._apply_parallel_flags(trainer_config)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as e:
            raise UserError(f"trainer: {e}") from None
        resumed = version_dir_of(self._ckpt) if self._ckpt is not None and self.subcommand == "fit" else None
        if resumed is None or not trainer.loggers or resumed.parent.resolve() != Path(trainer.loggers[0].root_dir).resolve():
            share_run_version(trainer.loggers)
            return trainer
        share_run_version(trainer.loggers, int(resumed.name.removeprefix("version_")))
        # A resumed run continues its own directories, which Lightning warns are not empty.
        warnings.filterwarnings("ignore", message="(Experiment logs|Checkpoint) directory .* exists and is not empty")
        step = read_global_step(self._ckpt)
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                continue_metrics(logger, step)
        print(f"soma-lightning: resuming run {resumed}", file=sys.stderr)
        return trainer

    def _apply_parallel_flags(self, trainer_config: dict) -> None:
        """`--parallel.*` other than the defaults set FSDP2Strategy's degrees (the strategy too when none is
        chosen); another strategy cannot take them."""
        dims = self._get(self.config_init, "parallel")
        if dims is None or dims == ParallelDims():
            return
        devices, nodes = trainer_config.get("devices"), trainer_config.get("num_nodes") or 1
        devices = len(devices) if isinstance(devices, list) else int(devices) if str(devices).isdigit() else None
        if devices:  # else known once the strategy sets up
            dims.resolved(devices * nodes)
        strategy = trainer_config.get("strategy")
        if isinstance(strategy, FSDP2Strategy):
            strategy.parallel = dims
        elif strategy in (None, "auto"):
            trainer_config["strategy"] = FSDP2Strategy(**asdict(dims))
        else:
            name = strategy if isinstance(strategy, str) else type(strategy).__name__
            raise UserError(
                f"--parallel.*: tensor, expert and context parallel need soma_lightning.strategies.FSDP2Strategy "
                f"(--config specs/strategies/parallel.yaml); trainer.strategy is {name}"
            )

    def _instantiate_trainer(self, config: dict, callbacks: list[L.Callback]) -> L.Trainer:
        # `--trainer.enable_checkpointing false` turns off the `checkpoint` callback this CLI always adds, which
        # Lightning would otherwise refuse as a contradiction.
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        root = Path(getattr(self.trainer.logger, "root_dir", None) or self.trainer.default_root_dir)
        for partial in root.glob("*/checkpoints/*.ckpt.tmp"):
            shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
            print(f"soma-lightning: removed {partial}, left by an interrupted save", file=sys.stderr)

    def after_fit(self) -> None:
        """A run stopped by NonFiniteGuard ends with its one-line report and a non-zero exit."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, NonFiniteGuard) and callback.action == "stop" and callback.last_report is not None:
                raise TrainingStopped(f"training stopped: {callback.last_report['message']}")

    def _write_results(self) -> None:
        """The metrics validate/test logged, as JSON beside the checkpoint."""
        metrics = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in self.trainer.callback_metrics.items()}
        path = self._results_path(".json")
        if self.trainer.is_global_zero:
            ckpt = str(self._ckpt) if self._ckpt is not None else None
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"ckpt": ckpt, **metrics}, indent=1) + "\n"))
            print(f"soma-lightning: {self.subcommand}: results written to {path}", file=sys.stderr)

    after_validate = after_test = _write_results


# Warnings of every run that a user cannot act on, each understood.
UNDERSTOOD_WARNINGS = (
    # torch deprecates LeafSpec checks that Lightning's own pytree helper still makes.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # SomaLM checks token ids in on_before_batch_transfer for any data module; Lightning says it uses the module's.
    r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    # The evaluation metrics are torchmetrics means, already reduced over ranks when they are logged.
    r"It is recommended to use `self.log\('(val|test)/",
)


def _no_advertisement(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip:")  # Lightning's suggestion of a hosted logging product


def cli_main(args: list[str] | None = None) -> None:
    """Run a training command (fit, validate, test or predict) with `args` (default: sys.argv)."""
    for message in UNDERSTOOD_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_advertisement)
    with restricted_unpickling(), sdpa_kernel(SDPA_PRIORITY, set_priority=True):
        SomaCLI(
            SomaLM,
            L.LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_callback=LogConfigCallback,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            args=args,
        )
