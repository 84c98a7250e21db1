"""The report's figures (matplotlib, file-only backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from fedmergenet.results import (
    RunResult,
)

from .numbers import Comparison, sorted_rows
from .runs import is_number

FIGURES = ("top1_vs_epochs.png", "loss_vs_epochs.png", "convergence.png", "final_accuracy.png", "gate_vs_epochs.png")
FIGSIZE = (8.0, 5.0)
DPI = 100

# One colour per arm in every figure, so a reader can match lines and bars.
ARM_COLOURS = {
    "central": "tab:blue",
    "central_mergenet": "tab:orange",
    "central_placebo": "tab:olive",
    "fedavg": "tab:green",
    "fedavg_mergenet": "tab:red",
    "fedavg_placebo": "tab:purple",
}


def _pyplot():  # type: ignore[no-untyped-def]
    """pyplot on the file-only backend, chosen here so importing the package stays display-free."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    # No bbox_inches="tight": it would crop and change the 800x500 pixel size.
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    fig.clf()
    return path


def mean_curve(runs: Sequence[RunResult], key: str) -> tuple[Any, Any, Any, Any]:
    """(epochs, mean, min, max) of ``key`` over seeds, on the epochs every seed covers."""
    import numpy as np

    curves = [sorted_rows(r.rows, key) for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        empty = np.array([])
        return empty, empty, empty, empty
    # Seeds can log at different epochs (or one ran longer): interpolate onto the union of
    # their epochs, limited to the span all of them cover, so the mean never mixes in gaps.
    start = max(c[0][0] for c in curves)
    stop = min(c[-1][0] for c in curves)
    grid = np.array(sorted({e for c in curves for e, _ in c if start <= e <= stop}))
    stack = np.array([np.interp(grid, [e for e, _ in c], [v for _, v in c]) for c in curves])
    return grid, stack.mean(axis=0), stack.min(axis=0), stack.max(axis=0)


def _fusion_epochs(runs: Sequence[RunResult]) -> list[float]:
    return sorted({float(r["epoch_equiv"]) for run in runs for r in run.rows
                   if is_number(r.get("fusion_applied")) and r["fusion_applied"] > 0
                   and is_number(r.get("epoch_equiv"))})


def plot_curves(groups: dict[str, list[RunResult]], key: str, path: Path) -> Path:
    """Test top-1 (%) or test loss against epoch-equivalents, one line per arm."""
    import numpy as np

    plt = _pyplot()
    scale, ylabel, title = ((100.0, "test top-1 accuracy (%)", "Test top-1 accuracy")
                            if key == "test_top1" else (1.0, "test loss (cross-entropy)", "Test loss"))
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for arm, runs in groups.items():
        colour = ARM_COLOURS.get(arm)
        grid, mean, low, high = mean_curve(runs, key)
        if not len(grid):
            continue
        ax.plot(grid, mean * scale, color=colour, label=f"{arm} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(grid, low * scale, high * scale, color=colour, alpha=0.2)
        fused = [e for e in _fusion_epochs(runs) if grid[0] <= e <= grid[-1]]
        if arm.startswith("fedavg") and fused:
            ax.plot(fused, np.interp(fused, grid, mean) * scale, linestyle="none", marker="o",
                    markersize=4, color=colour, label=f"{arm}: round with fusion")
    ax.set_xlabel("epoch-equivalents (passes over the training data)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} vs epoch-equivalents (mean over seeds, shaded: min-max)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # every arm may lack the value (all null)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_gate(groups: dict[str, list[RunResult]], path: Path) -> Path:
    """The fusion gate against epoch-equivalents, one line per run: how far fusion acts over the
    run (the gate's sign differs between seeds, so a mean over seeds would hide it)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for arm, runs in groups.items():
        for i, run in enumerate(runs):
            pairs = sorted_rows(run.rows, "gate")
            if not pairs:
                continue
            ax.plot([e for e, _ in pairs], [g for _, g in pairs], color=ARM_COLOURS.get(arm), marker="o",
                    markersize=3, alpha=0.8, label=f"{arm} (one line per seed)" if i == 0 else None)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("epoch-equivalents (passes over the training data)")
    ax.set_ylabel("gate (0 = fusion is the identity)")
    ax.set_title("Fusion gate vs epoch-equivalents (gated mode)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no run recorded a gate", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_convergence(table: Comparison, path: Path) -> Path:
    """Grouped bars: epoch-equivalents each arm needs to reach each threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    width = 0.8 / len(table.arms)
    reached = [e for a in table.arms for e in a.epochs_to if e is not None]
    # A "not reached" bar is drawn to the longest run, hatched: the arm needs more than that.
    ceiling = max([a.epochs_run or 0.0 for a in table.arms] + reached + [1.0])
    for i, stats in enumerate(table.arms):
        colour = ARM_COLOURS.get(stats.arm)
        for j, epochs in enumerate(stats.epochs_to):
            x = j - 0.4 + width * (i + 0.5)
            label = stats.arm if j == 0 else None
            if epochs is None:
                ax.bar(x, ceiling, width, facecolor="none", edgecolor=colour, hatch="//", label=label)
                ax.text(x, ceiling / 2, "not reached", rotation=90, ha="center", va="center",
                        fontsize="x-small")
            else:
                ax.bar(x, epochs, width, color=colour, label=label)
    ax.set_xticks(range(len(table.thresholds)))
    ax.set_xticklabels([f"{f * 100:.0f}% of best\n({t * 100:.1f}% top-1)"
                        for f, t in zip(table.fractions, table.thresholds)])
    ax.set_xlabel("threshold (fraction of the best arm's mean final top-1)")
    ax.set_ylabel("epoch-equivalents to reach (mean over seeds)")
    ax.set_title("Convergence: epoch-equivalents to reach each top-1 threshold")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_final(table: Comparison, path: Path) -> Path:
    """Final and best top-1 per arm, error bars = std over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    xs = range(len(table.arms))
    for offset, kind, alpha in ((-0.2, "final", 1.0), (0.2, "best", 0.5)):
        values = [getattr(a, f"{kind}_top1") * 100 for a in table.arms]
        # NaN, not 0, for one seed: no error bar is drawn rather than a bar claiming no spread.
        stds = [getattr(a, f"{kind}_top1_std") for a in table.arms]
        errors = [math.nan if std is None else std * 100 for std in stds]
        ax.bar([x + offset for x in xs], values, 0.4, yerr=errors, capsize=4, alpha=alpha,
               color=[ARM_COLOURS.get(a.arm) for a in table.arms], edgecolor="black",
               label=f"{kind} top-1")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{a.arm}\n(n={a.n})" for a in table.arms])
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_xlabel("arm (n = seeds)")
    ax.set_title("Final and best test top-1 per arm (error bars: std over seeds)")
    ax.legend(fontsize="small")
    return _save(fig, path)


def write_figures(groups: dict[str, list[RunResult]], table: Comparison, out_dir: Path) -> list[Path]:
    """The four report figures, in FIGURES order."""
    return [
        plot_curves(groups, "test_top1", out_dir / FIGURES[0]),
        plot_curves(groups, "test_loss", out_dir / FIGURES[1]),
        plot_convergence(table, out_dir / FIGURES[2]),
        plot_final(table, out_dir / FIGURES[3]),
        plot_gate(groups, out_dir / FIGURES[4]),
    ]
