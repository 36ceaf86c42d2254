"""`soma-lightning evaluate`: lm-evaluation-harness tasks on a trained model (soma_lightning/evaluation.py)."""

import json
import sys
from pathlib import Path
from typing import Literal

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.cli.run_dir import version_dir_of
from soma_lightning.errors import UserError


def results_path(ckpt: str, which: str) -> Path:
    """Beside the checkpoint, as validate and test write: RUN/evaluate-<checkpoint stem>.json (a run directory's
    checkpoint named by `which`)."""
    path = Path(ckpt)
    if path.is_dir():
        folder = path.parent if path.name == "checkpoints" else path
        return folder / f"evaluate-{which}.json"
    return (version_dir_of(path) or path.parent) / f"evaluate-{path.stem}.json"


def evaluate(
    ckpt: str,
    tasks: str,
    include_path: str | None = None,
    limit: float | None = None,
    batch_size: int = 16,
    which: Literal["best", "last"] = "last",
    tokenizer: str | None = None,
    device: str = "cpu",
    out: str | None = None,
) -> None:
    """Run lm-evaluation-harness tasks on a trained model: prints a table (task, metric, value, stderr) and
    writes the harness's results as JSON. Needs the `eval` extra (lm_eval).

    Args:
        ckpt: a .ckpt file, a run directory (runs/NAME/version_N), or an export (as soma_lightning.load takes)
        tasks: comma-separated task names (the harness's, or those of --include_path)
        include_path: a folder of task YAML files to add to the harness's
        limit: documents per task at most (a fraction of each task if below 1); default: all
        batch_size: loglikelihood requests per forward pass, and generate_until requests decoded together
        which: which checkpoint of a run directory
        tokenizer: the model's tokenizer file, when it moved since training
        device: cpu, cuda or cuda:N
        out: the JSON file; default: beside the checkpoint, RUN/evaluate-<checkpoint>.json
    """
    from soma_lightning.evaluation import check_tasks, metric_rows, task_manager  # imports lm_eval: one line without it
    from soma_lightning.evaluation import evaluate as run_tasks
    from soma_lightning.loading import load

    names = [name.strip() for name in tasks.split(",") if name.strip()]
    path = Path(out) if out is not None else results_path(ckpt, which)
    if path.is_dir():
        raise UserError(f"--out: {path} is a directory; expected the path of a .json file")
    manager = task_manager(include_path)
    check_tasks(names, manager)  # before loading the model: a mistyped name fails fast
    module = load(ckpt, which, device, tokenizer)
    results = run_tasks(module, names, limit=int(limit) if limit is not None and limit >= 1 else limit, batch_size=batch_size, manager=manager)
    rows = metric_rows(results)
    print(f"{'task':<24} {'metric':<16} {'value':>10} {'stderr':>10}")
    for task, metric, value, stderr in rows:
        print(f"{task:<24} {metric:<16} {value:>10.4f} {'' if stderr is None else f'{stderr:.4f}':>10}")
    metrics: dict[str, dict] = {task: {} for task in results}
    for task, metric, value, stderr in rows:
        metrics[task][metric] = {"value": value, "stderr": stderr}
    payload = {"ckpt": ckpt, "tasks": names, "limit": limit, "results": metrics}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n"))
    print(f"soma-lightning: evaluate: results written to {path}", file=sys.stderr)
