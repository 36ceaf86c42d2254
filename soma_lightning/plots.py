"""The figures of the monitors and of `soma-lightning report`, drawn with matplotlib's object API (Agg, no
pyplot, no display)."""

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, MaxNLocator

from soma_lightning.checkpoint_io import atomic_write

Series = tuple[np.ndarray, np.ndarray]  # x, y


def save_figure(figure: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def _y_scale(ax, values: Sequence[np.ndarray]) -> None:
    """Log-scaled y, with plain numbers (0.25, 2, 3) at the ticks instead of powers of ten, when the values span
    more than a factor of 10; linear otherwise."""
    finite = np.concatenate([v[v > 0] for v in values]) if values else np.array([])
    if len(finite) == 0 or finite.max() / finite.min() <= 10:
        return
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:.3g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _step_axis(ax) -> None:
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


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
    """The train curve (raw, and smoothed when there are enough points) and the val points, against the step
    (metrics.csv's, 0-based) and, when the tokens per step are known, against tokens seen."""
    panels = 2 if tokens_per_step else 1
    figure = Figure(figsize=(6 * panels, 4.2), layout="constrained")
    for k in range(panels):
        ax = figure.add_subplot(1, panels, k + 1)
        x = (lambda steps: steps) if k == 0 else (lambda steps: (steps + 1) * tokens_per_step)  # tokens through that step
        steps, values = train
        window = len(values) // 25
        if window > 1:
            ax.plot(x(steps), values, color="tab:blue", alpha=0.25, linewidth=0.8, label="train")
            ax.plot(x(steps), smooth(values, window), color="tab:blue", label=f"train, mean of {window} logged points")
        elif len(steps):
            ax.plot(x(steps), values, color="tab:blue", label="train")
        if len(val[0]):
            ax.plot(x(val[0]), val[1], "o-", color="tab:orange", label="val")
            ax.annotate(f"{val[1][-1]:.3f}", (x(val[0])[-1], val[1][-1]), textcoords="offset points", xytext=(-10, 8), ha="right",
                        color="tab:orange", bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
        _y_scale(ax, [train[1], val[1]])
        if k == 0:
            _step_axis(ax)
        else:
            ax.set_xlabel("tokens seen")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    figure.suptitle(title)
    return figure


def lines_figure(title: str, ylabel: str, lines: dict[str, Series]) -> Figure:
    """One line per series against the step."""
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    ax = figure.add_subplot()
    for label, (x, y) in lines.items():
        ax.plot(x, y, label=label, marker="." if len(x) < 40 else None)
    _y_scale(ax, [y for _, y in lines.values()])
    _step_axis(ax)
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
    _step_axis(ax)
    ax.set_ylabel("tokens / s")
    ax.set_title("training throughput")
    ax.grid(True, alpha=0.3)
    if flops_per_token:
        right = ax.secondary_yaxis("right", functions=(lambda t: t * flops_per_token / 1e12, lambda f: f * 1e12 / flops_per_token))
        right.set_ylabel("TFLOP/s")
    if rows == 2:
        ax2 = figure.add_subplot(rows, 1, 2, sharex=ax)
        ax2.plot(mfu[0], mfu[1] * 100, color="tab:purple")
        _step_axis(ax2)
        ax2.set_ylabel("MFU (%)")
        ax2.grid(True, alpha=0.3)
    return figure


def graph_figure(steps: np.ndarray, edges_per_token: dict[str, np.ndarray], in_degree_hist: Sequence[int], out_degree_hist: Sequence[int], step: int) -> Figure:
    """SOSM graph: edges per token of each type against step; the last record's degree histograms."""
    figure = Figure(figsize=(13, 4.2), layout="constrained")
    ax = figure.add_subplot(1, 2, 1)
    for kind, values in edges_per_token.items():
        ax.plot(steps, values, marker=".", label=kind)
    _step_axis(ax)
    ax.set_ylabel("edges per token")
    ax.set_title("semantic graph: edges by type")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center right")
    ax = figure.add_subplot(1, 2, 2)
    for label, hist in (("out-degree (edges a token attends over)", out_degree_hist), ("in-degree (tokens attending to a position)", in_degree_hist)):
        hist = np.trim_zeros(np.asarray(hist, dtype=float), "b")
        ax.step(range(len(hist)), hist / max(hist.sum(), 1), where="mid", label=label)
    ax.set_xlabel("degree")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(f"degree histograms at step {step}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return figure
