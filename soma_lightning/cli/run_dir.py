"""Where a run lives: runs/NAME/version_N, shared by its loggers and checkpoints, and kept across resumes."""

import csv
import re
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from soma_lightning.errors import UserError

VERSION_DIR = re.compile(r"version_(\d+)")


def loggers_of(trainer: Namespace) -> list[Namespace]:
    """The logger entries (class_path/init_args) of a trainer config."""
    loggers = trainer.get("logger")
    return [logger for logger in (loggers if isinstance(loggers, list) else [loggers]) if isinstance(logger, (dict, Namespace))]


def name_run(trainer: Namespace, name: str) -> None:
    """Give every logger of a trainer config the run name `name`; checkpoints follow the first logger."""
    for logger in loggers_of(trainer):
        if logger.get("init_args") is None:
            logger["init_args"] = Namespace()
        logger["init_args"]["name"] = name


def run_root(trainer: Namespace) -> Path:
    """runs/NAME of a run's config: its first logger's save_dir/name (as the loggers lay out version_N), else
    Lightning's default_root_dir/lightning_logs."""
    for logger in loggers_of(trainer):
        init = logger.get("init_args")
        if init is not None and init.get("save_dir") is not None:
            return Path(init["save_dir"]) / (init.get("name") or "lightning_logs")
    return Path(trainer.get("default_root_dir") or ".") / "lightning_logs"


def last_checkpoint(root: Path) -> Path:
    candidates = list(root.glob("*/checkpoints/last.ckpt"))
    if not candidates:
        raise UserError(f"--ckpt_path last: no last.ckpt under {root}/*/checkpoints/")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def version_dir_of(checkpoint: Path) -> Path | None:
    """The run directory runs/NAME/version_N that holds a checkpoint in its checkpoints/ folder, if any."""
    folder = checkpoint.resolve().parent
    if folder.name == "checkpoints" and VERSION_DIR.fullmatch(folder.parent.name):
        return folder.parent
    return None


def share_run_version(loggers: list[Logger], version: int | None = None) -> None:
    """Give the CSV and TensorBoard loggers of one runs/NAME one version_N: `version` (a resumed run's), else
    the one the first of them takes. Each would otherwise take the next free version_N when first used, and
    the second would see the first's new directory."""
    dirs = [logger for logger in loggers if isinstance(logger, (CSVLogger, TensorBoardLogger))]
    for logger in dirs:
        if logger._version is None and (version is not None or logger is not dirs[0]) and logger.root_dir == dirs[0].root_dir:
            logger._version = version if version is not None else dirs[0].version


def continue_metrics(logger: CSVLogger, step: int | None) -> None:
    """Resume a CSV logger in its run's metrics.csv: Lightning's writer deletes an existing metrics.csv when it
    opens the directory, so the file is set aside while it does, and rows logged after the resumed step (an
    interrupted run's tail, which the resumed run logs again) are dropped (all rows stay when the step is not
    known)."""
    metrics = Path(logger.log_dir) / "metrics.csv"
    if not metrics.is_file():
        return
    aside = metrics.with_name("metrics.csv.resume")
    metrics.replace(aside)
    writer = logger.experiment  # creates the writer, which finds no metrics.csv to delete
    with open(aside, newline="") as f:
        reader = csv.DictReader(f)
        keys, rows = list(reader.fieldnames or []), [row for row in reader if step is None or not row.get("step") or int(row["step"]) <= step]
    with open(metrics, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=keys)
        out.writeheader()
        out.writerows(rows)
    aside.unlink()
    writer.metrics_keys = keys
