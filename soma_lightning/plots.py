"""The figures of the monitors and of `soma-lightning report`, drawn with matplotlib's object API (Agg, no
pyplot, no display)."""

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from soma_lightning.checkpoint_io import atomic_write

Series = tuple[np.ndarray, np.ndarray]  # x, y


def save_figure(figure: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over `window` points (shorter at the ends)."""
    if window <= 1 or len(y) < 3:
        return y
    kernel = np.ones(window)
    return np.convolve(y, kernel, mode="same") / np.convolve(np.ones_like(y), kernel, mode="same")


def expert_load_figure(layers: Sequence[str], tokens_per_expert: Sequence[Sequence[float]], dropped: Sequence[float], step: int) -> Figure:
    """Heatmap of each MoE layer's tokens per expert over the layer's mean (1 = balanced), one row per layer,
    with the fraction of dropped assignments in the row label."""
    load = np.asarray(tokens_per_expert, dtype=float)
    load = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-12)
    n_layers, n_experts = load.shape
    figure = Figure(figsize=(min(max(7, 4 + 0.5 * n_experts), 16), min(max(3.5, 1.5 + 0.45 * n_layers), 12)), layout="constrained")
    ax = figure.add_subplot()
    # Diverging around 1: balanced experts are white, overloaded red, starved blue.
    image = ax.imshow(load, cmap="coolwarm", aspect="auto", vmin=0, vmax=max(2.0, float(load.max())), interpolation="nearest")
    figure.colorbar(image, ax=ax, label="tokens / layer mean")
    ax.set_yticks(range(n_layers), [f"{name}  (dropped {d:.1%})" for name, d in zip(layers, dropped)], fontsize=8)
    ax.set_xticks(range(n_experts) if n_experts <= 32 else np.linspace(0, n_experts - 1, 9).round().astype(int))
    ax.set_xlabel("expert")
    ax.set_title(f"MoE expert load at step {step}")
    if n_experts * n_layers <= 256:
        for (i, j), value in np.ndenumerate(load):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    return figure


def train_val_figure(title: str, ylabel: str, train: Series, val: Series, tokens_per_step: int | None) -> Figure:
    """The train curve (raw, light, and smoothed) and the val points, against the step (metrics.csv's, 0-based)
    and, when the tokens per step are known, against tokens seen; log-scaled y."""
    panels = 2 if tokens_per_step else 1
    figure = Figure(figsize=(6 * panels, 4.2), layout="constrained")
    for k in range(panels):
        ax = figure.add_subplot(1, panels, k + 1)
        x = (lambda steps: steps) if k == 0 else (lambda steps: (steps + 1) * tokens_per_step)  # tokens through that step
        steps, values = train
        if len(steps):
            ax.plot(x(steps), values, color="tab:blue", alpha=0.25, linewidth=0.8)
            ax.plot(x(steps), smooth(values, max(1, len(values) // 25)), color="tab:blue", label="train (smoothed)")
        if len(val[0]):
            ax.plot(x(val[0]), val[1], "o-", color="tab:orange", label="val")
            ax.annotate(f"{val[1][-1]:.3f}", (x(val[0])[-1], val[1][-1]), textcoords="offset points", xytext=(-10, 8), ha="right", color="tab:orange")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(EngFormatter(places=1, sep=""))
        ax.yaxis.set_minor_formatter(EngFormatter(places=1, sep=""))
        ax.set_xlabel("step" if k == 0 else "tokens seen")
        if k == 1:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    figure.suptitle(title)
    return figure


def lines_figure(title: str, xlabel: str, ylabel: str, lines: dict[str, Series], log_y: bool = False) -> Figure:
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    ax = figure.add_subplot()
    for label, (x, y) in lines.items():
        ax.plot(x, y, label=label, marker="." if len(x) < 40 else None)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=8, ncol=max(1, math.ceil(len(lines) / 8)))
    return figure


def throughput_figure(tokens_per_s: Series, flops_per_token: float | None, mfu: Series | None) -> Figure:
    """Tokens/s against step, with TFLOP/s (tokens/s x the spec's FLOPs per token) on the right axis, and the
    MFU below when the GPU's peak was known."""
    rows = 2 if mfu is not None and len(mfu[0]) else 1
    figure = Figure(figsize=(7, 3.6 * rows), layout="constrained")
    ax = figure.add_subplot(rows, 1, 1)
    ax.plot(*tokens_per_s, color="tab:green")
    ax.set_ylim(0, float(np.max(tokens_per_s[1])) * 1.1)
    ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.set_title("training throughput")
    ax.grid(True, alpha=0.3)
    if flops_per_token:
        right = ax.secondary_yaxis("right", functions=(lambda t: t * flops_per_token / 1e12, lambda f: f * 1e12 / flops_per_token))
        right.set_ylabel("TFLOP/s")
    if rows == 2:
        ax2 = figure.add_subplot(rows, 1, 2, sharex=ax)
        ax2.plot(mfu[0], mfu[1] * 100, color="tab:purple")
        ax2.set_xlabel("step")
        ax2.set_ylabel("MFU (%)")
        ax2.grid(True, alpha=0.3)
    return figure


def graph_figure(steps: np.ndarray, edges_per_token: dict[str, np.ndarray], in_degree_hist: Sequence[int], out_degree_hist: Sequence[int], step: int) -> Figure:
    """SOSM graph: edges per token of each type against step; the last record's degree histograms."""
    figure = Figure(figsize=(13, 4.2), layout="constrained")
    ax = figure.add_subplot(1, 2, 1)
    for kind, values in edges_per_token.items():
        ax.plot(steps, values, marker=".", label=kind)
    ax.set_xlabel("step")
    ax.set_ylabel("edges per token")
    ax.set_title("semantic graph: edges by type")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax = figure.add_subplot(1, 2, 2)
    for label, hist in (("out-degree (edges a token attends over)", out_degree_hist), ("in-degree (tokens attending to a position)", in_degree_hist)):
        ax.step(range(len(hist)), np.asarray(hist) / max(sum(hist), 1), where="mid", label=label)
    ax.set_xlabel("degree")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(f"degree histograms at step {step}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return figure
