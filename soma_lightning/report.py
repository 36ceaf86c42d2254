"""`soma-lightning report RUN_DIR`: plots and a markdown summary of a finished (or running) run, from the files the
run wrote (metrics.csv, run_info.json, config.yaml, the monitors' JSONL), so that it reflects the run and not the
state of the repository today."""

import csv
import json
from pathlib import Path

import numpy as np

from soma_lightning.callbacks.monitors import EXPERT_LOAD_FILE, GRAPH_STATS_FILE
from soma_lightning.callbacks.run_info import RUN_INFO_FILE
from soma_lightning.errors import UserError
from soma_lightning.plots import Series, expert_load_figure, graph_figure, lines_figure, save_figure, throughput_figure, train_val_figure


class Metrics:
    """The columns of a CSVLogger metrics.csv: `series(key)` is (steps, values) over the rows that have the key."""

    def __init__(self, path: Path) -> None:
        with path.open(newline="") as f:
            self.rows = list(csv.DictReader(f))
        self.columns = list(self.rows[0]) if self.rows else []

    def series(self, key: str) -> Series:
        pairs = [(int(r["step"]), float(r[key])) for r in self.rows if r.get(key) not in (None, "")]
        return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)

    def last(self, key: str) -> tuple[int, float] | None:
        steps, values = self.series(key)
        return (int(steps[-1]), float(values[-1])) if len(steps) else None


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _plots(metrics: Metrics, info: dict, run_dir: Path, out: Path) -> list[tuple[str, str]]:
    """Writes the PNGs; returns (file name, caption) of each."""
    tokens_per_step = info.get("tokens_per_step")
    written = []

    def save(figure, name: str, caption: str) -> None:
        save_figure(figure, out / name)
        written.append((name, caption))

    for key, ylabel in (("loss", "loss (CE + SIGReg, nats)"), ("bits_per_byte", "bits per byte")):
        train, val = metrics.series(f"train/{key}"), metrics.series(f"val/{key}")
        if len(train[0]) or len(val[0]):
            save(train_val_figure(f"train and val {key.replace('_', ' ')}", ylabel, train, val, tokens_per_step), f"{key}.png",
                 f"train/{key} and val/{key} against steps" + (" and tokens seen" if tokens_per_step else ""))
    lr = {column.removeprefix("lr-"): metrics.series(column) for column in metrics.columns if column.startswith("lr-")}
    distinct = {}
    for name, (x, y) in lr.items():  # parameter groups on one schedule draw one line
        if not any(np.array_equal(y, other[1]) for other in distinct.values()):
            distinct[name] = (x, y)
    if distinct:
        save(lines_figure("learning rate", "learning rate", distinct), "learning_rate.png", "learning rate per optimizer parameter group (identical groups drawn once)")
    tokens_per_s = metrics.series("train/tokens_per_s")
    if len(tokens_per_s[0]):
        mfu = metrics.series("train/mfu")
        save(throughput_figure(tokens_per_s, info.get("train_flops_per_token"), mfu if len(mfu[0]) else None), "throughput.png",
             "tokens/s (TFLOP/s on the right axis, from the spec's analytic FLOPs per token)")
    for kind, title, ylabel in (
        ("grad_norm", "gradient norm per block", "L2 norm of the block's gradients"),
        ("activation_norm", "activation norm per block", "mean over tokens of the output's L2 norm"),
    ):
        columns = sorted((c for c in metrics.columns if c.startswith(f"blocks/{kind}_")), key=lambda c: int(c.rsplit("_", 1)[1]))
        if columns:
            lines = {f"block {c.rsplit('_', 1)[1]}": metrics.series(c) for c in columns}
            save(lines_figure(title, ylabel, lines), f"block_{kind}.png", f"{title} (model.encoder.layers, BlockNormMonitor)")
    loads = _jsonl(run_dir / EXPERT_LOAD_FILE)
    if loads:
        last = loads[-1]
        save(expert_load_figure(last["layers"], last["tokens_per_expert"], last["dropped_fraction"], last["step"]), "expert_load.png",
             f"tokens per expert over the layer's mean at step {last['step']} (the last ExpertLoadMonitor record)")
    graphs = _jsonl(run_dir / GRAPH_STATS_FILE)
    if graphs:
        steps = np.array([g["step"] for g in graphs])
        per_type = {kind: np.array([g["edges_per_token"][kind] for g in graphs]) for kind in graphs[0]["edges_per_token"]}
        save(graph_figure(steps, per_type, graphs[-1]["in_degree_hist"], graphs[-1]["out_degree_hist"], graphs[-1]["step"]), "graph.png",
             "SOSM graph: edges per token by type, and degree histograms (the last GraphMonitor record)")
    return written


def _final_metrics(metrics: Metrics, tokens_per_step: int | None) -> list[str]:
    lines = ["| metric | step | value |", "|---|---:|---:|"]
    for key in ("train/loss", "train/bits_per_byte"):
        steps, values = metrics.series(key)
        if len(values):
            tail = values[-max(1, len(values) // 10) :]
            lines.append(f"| {key} (mean of the last {len(tail)} logged) | {int(steps[-1])} | {tail.mean():.4f} |")
    for key in sorted(c for c in metrics.columns if c.startswith("val/")):
        last = metrics.last(key)
        if last:
            lines.append(f"| {key} | {last[0]} | {last[1]:.4f} |")
    steps, bpb = metrics.series("val/bits_per_byte")
    if len(bpb):
        lines.append(f"| best val/bits_per_byte | {int(steps[bpb.argmin()])} | {bpb.min():.4f} |")
    steps, tokens_per_s = metrics.series("train/tokens_per_s")
    if len(tokens_per_s):
        lines.append(f"| train/tokens_per_s (median of the last half) | {int(steps[-1])} | {np.median(tokens_per_s[len(tokens_per_s) // 2 :]):,.0f} |")
    last_step = int(max(metrics.series("train/loss")[0], default=-1))
    if tokens_per_step and last_step >= 0:
        lines.append(f"| tokens seen | {last_step} | {(last_step + 1) * tokens_per_step:,} |")
    return lines


def _summary(run_dir: Path, info: dict, metrics: Metrics, plots: list[tuple[str, str]]) -> str:
    lines = [f"# Run report: {run_dir}", ""]
    if not info:
        lines += [f"No {RUN_INFO_FILE} in the run directory (a run from before the RunInfo callback): spec hash, commit, "
                  "versions and hardware are unknown, and the token axes are left out.", ""]
    else:
        git, hw, params = info["git"], info["hardware"], info["parameters"]
        commit = git["commit"] or "unknown (not a git checkout)"
        if git["commit"] and git["dirty"]:
            commit += " with uncommitted changes"
        device = ", ".join(hw["gpus"]) if hw["gpus"] else f"{hw['cpu']} ({hw['cpu_count']} CPUs)"
        lines += [
            "| | |", "|---|---|",
            f"| resolved spec (SHA-256 of the model hyper-parameters) | `{info['spec_sha256']}` |",
            f"| config.yaml SHA-256 | `{info['config_sha256']}` |",
            f"| git commit | `{commit}` |",
            f"| command | `{' '.join(info['command'])}` |",
            f"| started | {info['created']} at step {info['start_step']} |",
            f"| hardware | {device}; {hw['accelerator']}, world size {hw['world_size']}, {hw['num_nodes']} node(s); {hw['platform']} |",
            f"| precision | {info['precision']} |",
            f"| parameters | {params['total']:,} total, {params['active']:,} active per token |",
            f"| train FLOPs per token | {info['train_flops_per_token'] / 1e6:,.2f} MFLOP |",
            f"| tokens per optimizer step | {info['tokens_per_step']:,} |",
            "", "## Package versions", "",
            ", ".join(f"{name} {version}" for name, version in info["packages"].items() if version), "",
        ]
    lines += ["## Final metrics", "", *_final_metrics(metrics, info.get("tokens_per_step")), "", "## Plots", ""]
    for name, caption in plots:
        lines += [f"![{name}]({name})", "", caption, ""]
    return "\n".join(lines)


def write_report(run_dir: str, out: str | None = None) -> dict:
    """Plots (PNG) and summary.md of a run directory (runs/NAME/version_N) into `out` (default RUN_DIR/report)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"RUN_DIR: {run_dir!r} is not a directory (expected a run directory runs/NAME/version_N)")
    metrics_csv = run / "metrics.csv"
    if not metrics_csv.is_file():
        raise UserError(f"RUN_DIR: no metrics.csv in {run_dir} (expected a run directory runs/NAME/version_N written by soma-lightning fit with its CSV logger)")
    metrics = Metrics(metrics_csv)
    if not metrics.rows:
        raise UserError(f"RUN_DIR: {metrics_csv} has no rows yet")
    info_path = run / RUN_INFO_FILE
    try:
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    except json.JSONDecodeError as e:
        raise UserError(f"RUN_DIR: {info_path} is not valid JSON ({e})") from None
    target = Path(out) if out else run / "report"
    target.mkdir(parents=True, exist_ok=True)
    plots = _plots(metrics, info, run, target)
    summary = target / "summary.md"
    summary.write_text(_summary(run, info, metrics, plots))
    return {"run_dir": str(run), "summary": str(summary), "plots": [str(target / name) for name, _ in plots]}
