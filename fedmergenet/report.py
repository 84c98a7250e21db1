"""The comparison report: reads run folders, compares the arms, writes figures and report.md.

Every number in the report is computed from the run folders (through ``fedmergenet.results``),
never from constants: convergence thresholds are fractions of the best arm's mean final top-1,
and the conclusion is worded from the gaps and the spread over seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fedmergenet.atomic import write_text
from fedmergenet.errors import UserError
from fedmergenet.results import (
    ARMS,
    METRICS_FILE,
    PLACEBO_OF,
    SUMMARY_FILE,
    ResultsError,
    RunResult,
    read_run,
)

FRACTIONS = (0.5, 0.75, 0.9, 0.95)
FIGURES = ("top1_vs_epochs.png", "loss_vs_epochs.png", "convergence.png", "final_accuracy.png", "gate_vs_epochs.png")
FIGSIZE = (8.0, 5.0)
DPI = 100
NA = "n/a"

# Config keys that name where or under what name a run was written: they always differ
# between runs and say nothing about the experiment. Compared after "-" -> "_".
IGNORED_SETTINGS = frozenset(
    {"out", "out_dir", "output", "output_dir", "results_dir", "result_dir", "run_dir",
     "run_name", "name", "log_dir", "logdir", "resume"}
)

# One colour per arm in every figure, so a reader can match lines and bars.
ARM_COLOURS = {
    "central": "tab:blue",
    "central_mergenet": "tab:orange",
    "central_placebo": "tab:olive",
    "fedavg": "tab:green",
    "fedavg_mergenet": "tab:red",
    "fedavg_placebo": "tab:purple",
}


# --------------------------------------------------------------------------- discovery


def _is_run_dir(path: Path) -> bool:
    return (path / SUMMARY_FILE).is_file() or (path / METRICS_FILE).is_file()


def _candidate_dirs(path: Path) -> list[Path]:
    """The run folders at or under ``path`` (a run folder is not searched further)."""
    if path.is_file() and path.name in (SUMMARY_FILE, METRICS_FILE):
        return [path.parent]
    if _is_run_dir(path):
        return [path]
    found = {p.parent for name in (SUMMARY_FILE, METRICS_FILE) for p in path.rglob(name)}
    # A folder nested inside another run folder belongs to that run, not to the comparison.
    return sorted(d for d in found if not any(a in found for a in d.parents))


def _unusable_reason(run: RunResult) -> str | None:
    """Why a readable run still cannot be compared, or None if it can."""
    summary = run.summary
    status = summary.get("status", "completed")
    if status != "completed":
        return f"{run.path / SUMMARY_FILE} has status {status!r}, not 'completed'"
    if not isinstance(summary["config"], dict):
        return f"{run.path / SUMMARY_FILE}: config is not an object"
    for key in ("best_top1", "final_top1"):
        if not _is_number(summary[key]):
            return f"{run.path / SUMMARY_FILE}: {key} is not a number"
    try:
        run.seed
    except (TypeError, ValueError):
        return f"{run.path / SUMMARY_FILE}: config seed is not an integer"
    return None


def discover_runs(paths: Sequence[Path]) -> tuple[list[RunResult], list[tuple[Path, str]]]:
    """Find run folders at or under ``paths``; return the usable runs and (folder, reason) skips."""
    runs: list[RunResult] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            skipped.append((root, f"{root} does not exist"))
            continue
        for run_dir in _candidate_dirs(root):
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            try:
                run = read_run(run_dir)
            except ResultsError as exc:
                skipped.append((run_dir, str(exc)))
                continue
            reason = _unusable_reason(run)
            if reason:
                skipped.append((run_dir, reason))
            else:
                runs.append(run)
    return runs, skipped


def group_by_arm(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Runs per arm, the suite's arms in ARMS order then others (other strategies) by name, runs
    by seed; arms without runs are left out."""
    groups: dict[str, list[RunResult]] = {}
    for arm in arm_order({r.arm for r in runs}):
        members = sorted((r for r in runs if r.arm == arm), key=lambda r: (r.seed, str(r.path)))
        if members:
            groups[arm] = members
    return groups


def arm_order(arms: set[str]) -> list[str]:
    return [a for a in ARMS if a in arms] + sorted(arms - set(ARMS))


def duplicate_seeds(runs: Sequence[RunResult]) -> list[str]:
    """Arm/seed pairs found in more than one folder: they would weigh twice in the means."""
    folders: dict[tuple[str, int], list[str]] = {}
    for run in runs:
        folders.setdefault((run.arm, run.seed), []).append(str(run.path))
    return [f"{arm} seed {seed} appears in {len(p)} folders: {', '.join(p)}"
            for (arm, seed), p in folders.items() if len(p) > 1]


# --------------------------------------------------------------------------- numbers


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Sequence[Any]) -> float | None:
    """Mean over seeds; None unless every run recorded the value (a subset's mean would mislead)."""
    if not values or not all(_is_number(v) for v in values):
        return None
    return statistics.fmean(float(v) for v in values)


def _std(values: Sequence[float]) -> float | None:
    """Sample standard deviation over seeds; None for a single seed (no spread known)."""
    return statistics.stdev(values) if len(values) > 1 else None


def thresholds(best_final: float, fractions: Sequence[float] = FRACTIONS) -> list[float]:
    """Top-1 levels to time convergence against, relative to the best final top-1 compared."""
    return [best_final * f for f in fractions]


def _sorted_rows(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(epoch_equiv, value) pairs in epoch order, leaving out rows where the value is null."""
    pairs = [(float(r["epoch_equiv"]), float(r[key])) for r in rows
             if _is_number(r.get("epoch_equiv")) and _is_number(r.get(key))]
    return sorted(pairs)


def epochs_to_reach(rows: Sequence[dict[str, Any]], threshold: float) -> float | None:
    """First epoch-equivalent at which test top-1 >= threshold; None if it never does."""
    for epoch, top1 in _sorted_rows(rows, "test_top1"):
        if top1 >= threshold:
            return epoch
    return None


def _wall_time(run: RunResult) -> float | None:
    # The rows' wall time is cumulative, so the last row stands in for a missing summary value.
    value = run.summary.get("wall_time_s", run.rows[-1].get("wall_time_s"))
    return float(value) if _is_number(value) else None


def _bytes_total(run: RunResult) -> float | None:
    if _is_number(run.summary.get("bytes_total")):
        return float(run.summary["bytes_total"])
    per_row = [r.get(k) for r in run.rows for k in ("bytes_down", "bytes_up")]
    numbers = [float(v) for v in per_row if _is_number(v)]
    return sum(numbers) if numbers else None


def _bytes_per_round(run: RunResult) -> float | None:
    if _is_number(run.summary.get("bytes_per_round")):
        return float(run.summary["bytes_per_round"])
    total = _bytes_total(run)
    return total / len(run.rows) if total is not None else None


def _fusion_rounds(run: RunResult) -> float | None:
    if _is_number(run.summary.get("fusion_rounds")):
        return float(run.summary["fusion_rounds"])
    # fusion_applied is 0/1 per federated round and a count per central epoch: the sum is
    # the number of fusions in both cases.
    values = [r.get("fusion_applied") for r in run.rows if _is_number(r.get("fusion_applied"))]
    return float(sum(values)) if values else None


def _teacher_source(runs: Sequence[RunResult]) -> str:
    sources = []
    for run in runs:
        teacher = run.summary.get("teacher")
        source = teacher.get("source") if isinstance(teacher, dict) else None
        if source and str(source) not in sources:
            sources.append(str(source))
    return "/".join(sources) if sources else NA


@dataclass
class ArmStats:
    """One arm's numbers over its seeds (accuracies as fractions, None where unknown)."""

    arm: str
    seeds: list[int]
    best_top1: float
    best_top1_std: float | None
    final_top1: float
    final_top1_std: float | None
    final_top1_min: float
    final_top1_max: float
    best_top5: float | None
    final_top5: float | None
    epochs_run: float | None
    epochs_to: list[float | None]
    wall_time_s: float | None
    bytes_total: float | None
    bytes_per_round: float | None
    fusion_rounds: float | None
    teacher: str

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass
class Comparison:
    """The table the report is written from."""

    fractions: list[float]
    best_final: float
    thresholds: list[float]
    arms: list[ArmStats] = field(default_factory=list)

    def arm(self, name: str) -> ArmStats | None:
        return next((a for a in self.arms if a.arm == name), None)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _epochs_to(runs: Sequence[RunResult], threshold: float) -> float | None:
    """Mean over seeds, or None ("not reached") when any seed never reaches the threshold."""
    reached = [epochs_to_reach(r.rows, threshold) for r in runs]
    return None if any(e is None for e in reached) else statistics.fmean(reached)  # type: ignore[arg-type]


def _arm_stats(arm: str, runs: Sequence[RunResult], levels: Sequence[float]) -> ArmStats:
    finals = [float(r.summary["final_top1"]) for r in runs]
    bests = [float(r.summary["best_top1"]) for r in runs]
    last_epochs = [max((e for e, _ in _sorted_rows(r.rows, "epoch_equiv")), default=None) for r in runs]
    return ArmStats(
        arm=arm,
        seeds=[r.seed for r in runs],
        best_top1=statistics.fmean(bests),
        best_top1_std=_std(bests),
        final_top1=statistics.fmean(finals),
        final_top1_std=_std(finals),
        final_top1_min=min(finals),
        final_top1_max=max(finals),
        best_top5=_mean([r.summary.get("best_top5") for r in runs]),
        final_top5=_mean([r.summary.get("final_top5") for r in runs]),
        epochs_run=_mean(last_epochs),
        epochs_to=[_epochs_to(runs, t) for t in levels],
        wall_time_s=_mean([_wall_time(r) for r in runs]),
        bytes_total=_mean([_bytes_total(r) for r in runs]),
        bytes_per_round=_mean([_bytes_per_round(r) for r in runs]),
        fusion_rounds=_mean([_fusion_rounds(r) for r in runs]),
        teacher=_teacher_source(runs),
    )


def arm_table(runs: Sequence[RunResult], fractions: Sequence[float] = FRACTIONS) -> Comparison:
    """Per-arm means (and spread) over seeds; thresholds relative to the best arm's mean final top-1."""
    groups = group_by_arm(runs)
    if not groups:
        raise ValueError("arm_table needs at least one run")
    best_final = max(statistics.fmean(float(r.summary["final_top1"]) for r in g) for g in groups.values())
    levels = thresholds(best_final, fractions)
    arms = [_arm_stats(arm, members, levels) for arm, members in groups.items()]
    return Comparison(fractions=list(fractions), best_final=best_final, thresholds=levels, arms=arms)


def differing_settings(runs: Sequence[RunResult]) -> dict[str, list[Any]]:
    """Config keys whose values differ between runs, with their distinct values (None = unset).

    Keys are compared with "-" read as "_", so ``local-epochs`` and ``local_epochs`` are one
    setting; keys naming the output folder or run are left out.
    """
    configs = [{k.replace("-", "_"): v for k, v in r.summary["config"].items()} for r in runs]
    keys = sorted({k for c in configs for k in c} - IGNORED_SETTINGS)
    differing: dict[str, list[Any]] = {}
    for key in keys:
        distinct: dict[str, Any] = {}
        for config in configs:
            value = config.get(key)
            distinct.setdefault(json.dumps(value, sort_keys=True, default=str), value)
        if len(distinct) > 1:
            differing[key] = list(distinct.values())
    return differing


# --------------------------------------------------------------------------- conclusion


def _no_clear_reason(a: ArmStats, b: ArmStats) -> str | None:
    """Why the gap between two arms is not a clear difference, or None if it is."""
    single = [x.arm for x in (a, b) if x.n < 2]
    if len(single) == 2:
        return "one seed per arm, so the spread over seeds is unknown"
    if single:
        return f"{single[0]} has one seed, so its spread over seeds is unknown"
    gap = abs(a.final_top1 - b.final_top1)
    spread = max(a.final_top1_std or 0.0, b.final_top1_std or 0.0)
    if gap <= spread:
        return f"gap within the seeds' spread (std up to {spread * 100:.1f} pp)"
    low, high = (a, b) if a.final_top1 < b.final_top1 else (b, a)
    if low.final_top1_max >= high.final_top1_min:
        return "the seeds' ranges overlap"
    return None


def _verdict(a: ArmStats, b: ArmStats) -> str:
    reason = _no_clear_reason(a, b)
    return "a clear difference" if reason is None else f"no clear difference ({reason})"


def _fed_vs_central(table: Comparison) -> str | None:
    """The question the project asks: does federated MergeNet keep up with central MergeNet?"""
    fed, cen = table.arm("fedavg_mergenet"), table.arm("central_mergenet")
    if fed is None or cen is None:
        return None
    diff = (fed.final_top1 - cen.final_top1) * 100
    question = "Does fedavg_mergenet match or beat central_mergenet?"
    reason = _no_clear_reason(fed, cen)
    if reason is None:
        answer = (f"yes, it beats it by {diff:.1f} pp" if diff > 0
                  else f"no, it is {-diff:.1f} pp lower")
        return f"{question} {answer} (a clear difference)."
    if fed.n < 2 or cen.n < 2:
        return f"{question} cannot tell: {diff:+.1f} pp, no clear difference ({reason})."
    return f"{question} yes, it matches it: {diff:+.1f} pp, no clear difference ({reason})."


def paired_gaps(runs: Sequence[RunResult], arm: str, control: str) -> dict[int, float]:
    """Final top-1 of ``arm`` minus ``control``, seed by seed (same seed: same start and data order)."""
    finals = {(r.arm, r.seed): float(r.summary["final_top1"]) for r in runs}
    seeds = sorted(s for a, s in finals if a == arm and (control, s) in finals)
    return {s: finals[(arm, s)] - finals[(control, s)] for s in seeds}


@dataclass(frozen=True)
class PairedGap:
    """``arm`` minus ``control`` in pp: the mean over paired seeds and its spread (sample std of
    the per-seed gaps; None with one seed)."""

    mean: float
    spread: float | None
    seeds: list[int]


def paired_gap(runs: Sequence[RunResult], arm: str, control: str) -> PairedGap | None:
    gaps = paired_gaps(runs, arm, control)
    if not gaps:
        return None
    spread = statistics.stdev(gaps.values()) * 100 if len(gaps) > 1 else None
    return PairedGap(statistics.fmean(gaps.values()) * 100, spread, list(gaps))


def placebo_of(arm: str) -> str | None:
    """The control of a MergeNet arm (``fedadam_mergenet`` -> ``fedadam_placebo``), else None."""
    return PLACEBO_OF.get(arm) or (arm.removesuffix("_mergenet") + "_placebo" if arm.endswith("_mergenet") else None)


def teacher_credit(runs: Sequence[RunResult], arm: str) -> str | None:
    """Does the trained teacher beat its placebo? Credited only when the mean paired gap exceeds
    the spread (sample std) of the paired gaps over seeds."""
    control = placebo_of(arm)
    gap = paired_gap(runs, arm, control) if control else None
    if gap is None:
        return None
    mean, spread = gap.mean, gap.spread
    question = f"Does the trained teacher help {arm} beyond its placebo {control}?"
    if spread is None:
        return (f"{question} cannot tell: {mean:+.1f} pp on one paired seed, so the spread over seeds is "
                "unknown and nothing is credited to the teacher.")
    seeds = ", ".join(map(str, gap.seeds))
    detail = f"{mean:+.1f} pp, paired over seeds {seeds}, spread (std of the gaps) {spread:.1f} pp"
    if mean > spread:
        return f"{question} yes: {detail}; the gain exceeds the spread, so it is credited to the teacher's knowledge."
    if -mean > spread:
        return f"{question} no, it hurts: {detail}; the trained teacher does worse than its placebo."
    return (f"{question} not shown: {detail}; the gap is within the spread, so no gain can be credited to "
            "the teacher (what fusion does here, perturbation does as well).")


def conclusion(table: Comparison, runs: Sequence[RunResult] = ()) -> str:
    """The verdict in words, from the table's numbers; the first line is the headline. With the
    runs, the trained-teacher arms are also compared with their placebos, paired by seed."""
    ranked = sorted(table.arms, key=lambda a: a.final_top1, reverse=True)
    best = ranked[0]
    head = f"Best arm by mean final top-1: {best.arm} ({best.final_top1 * 100:.1f}%)"
    if len(ranked) == 1:
        return head + "; it is the only arm, so there is nothing to compare."
    runner = ranked[1]
    gap = (best.final_top1 - runner.final_top1) * 100
    lines = [f"{head}, {gap:.1f} pp above the runner-up {runner.arm} "
             f"({runner.final_top1 * 100:.1f}%): {_verdict(best, runner)}."]
    for other in ranked[2:]:
        gap = (best.final_top1 - other.final_top1) * 100
        lines.append(f"{best.arm} vs {other.arm} ({other.final_top1 * 100:.1f}%): "
                     f"{gap:.1f} pp above, {_verdict(best, other)}.")
    answer = _fed_vs_central(table)
    if answer:
        lines.append(answer)
    arms = arm_order({r.arm for r in runs})
    lines += [line for arm in arms if (line := teacher_credit(runs, arm))]
    lines += [line for arm in arms if (line := strategy_difference(runs, arm))]
    return "\n".join(lines)


def strategy_difference(runs: Sequence[RunResult], arm: str) -> str | None:
    """A federated arm against the FedAvg arm with the same fusion: runs that differ only in the
    server strategy (or DP), paired by seed; a difference counts when it exceeds the spread."""
    aggregation = arm.split("_")[0]  # arm names are <aggregation>[_mergenet|_placebo]
    if aggregation in ("central", "fedavg"):
        return None
    control = "fedavg" + arm.removeprefix(aggregation)
    gap = paired_gap(runs, arm, control)
    if gap is None:
        return None
    head = f"{arm} vs {control} (only the strategy differs): {gap.mean:+.1f} pp"
    if gap.spread is None:
        return f"{head} on one paired seed; the spread over seeds is unknown, so no difference is claimed."
    verdict = "a clear difference" if abs(gap.mean) > gap.spread else "within the spread, no clear difference"
    return f"{head}, paired over seeds {', '.join(map(str, gap.seeds))}, spread {gap.spread:.1f} pp: {verdict}."


# --------------------------------------------------------------------------- figures


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

    curves = [_sorted_rows(r.rows, key) for r in runs]
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
                   if _is_number(r.get("fusion_applied")) and r["fusion_applied"] > 0
                   and _is_number(r.get("epoch_equiv"))})


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
            pairs = _sorted_rows(run.rows, "gate")
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


# --------------------------------------------------------------------------- text


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return NA
    return f"{value * 100:.2f}" + (f" ± {std * 100:.2f}" if std is not None else "")


def _num(value: float | None, digits: int = 1) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return NA
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return NA  # unreachable: the loop returns at GiB


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_markdown(table: Comparison) -> str:
    header = ["arm", "seeds", "best top-1 %", "final top-1 %", "best top-5 %", "final top-5 %"]
    header += [f"epochs to {f * 100:.0f}%" for f in table.fractions]
    rows = [[a.arm, ", ".join(map(str, a.seeds)), _pct(a.best_top1, a.best_top1_std),
             _pct(a.final_top1, a.final_top1_std), _pct(a.best_top5), _pct(a.final_top5)]
            + [_num(e) if e is not None else "not reached" for e in a.epochs_to]
            for a in table.arms]
    return _markdown_table(header, rows)


def cost_markdown(table: Comparison) -> str:
    header = ["arm", "epoch-equivalents run", "wall time (s)", "bytes total", "bytes per round",
              "fusion rounds", "teacher"]
    rows = [[a.arm, _num(a.epochs_run), _num(a.wall_time_s), _bytes(a.bytes_total),
             _bytes(a.bytes_per_round), _num(a.fusion_rounds), a.teacher] for a in table.arms]
    return _markdown_table(header, rows)


def runs_markdown(runs: Sequence[RunResult]) -> str:
    rows = [[r.arm, str(r.seed), _pct(r.summary["best_top1"]), _pct(r.summary["final_top1"]),
             str(r.summary.get("status", NA)), str(r.path)]
            for r in sorted(runs, key=lambda r: (arm_order({x.arm for x in runs}).index(r.arm), r.seed, str(r.path)))]
    return _markdown_table(["arm", "seed", "best top-1 %", "final top-1 %", "status", "folder"], rows)


def render_markdown(runs: Sequence[RunResult], skipped: Sequence[tuple[Path, str]],
                    table: Comparison, verdict: str) -> str:
    """report.md's text."""
    levels = ", ".join(f"{f * 100:.0f}% ({t * 100:.2f}% top-1)"
                       for f, t in zip(table.fractions, table.thresholds))
    settings = differing_settings(runs)
    notes = duplicate_seeds(runs)
    parts = [
        "# Federated MergeNet: comparison of the arms",
        "## Conclusion",
        "\n".join(f"- {line}" for line in verdict.splitlines()),
        "## Accuracy and convergence",
        "Accuracies are test top-1/top-5 in %, mean ± sample std over seeds (no ± for one seed). "
        f"Convergence thresholds are fractions of the best arm's mean final top-1 "
        f"({table.best_final * 100:.2f}%): {levels}. \"Epochs to\" is the first epoch-equivalent "
        "at which test top-1 reaches the threshold, averaged over seeds; \"not reached\" if any "
        "seed never reaches it.",
        accuracy_markdown(table),
        "## Cost",
        "Means over seeds; n/a where a run did not record the value.",
        cost_markdown(table),
        "## Figures",
        "![Test top-1 vs epoch-equivalents](top1_vs_epochs.png)",
        "![Test loss vs epoch-equivalents](loss_vs_epochs.png)",
        "![Epoch-equivalents to reach each threshold](convergence.png)",
        "![Final and best top-1 per arm](final_accuracy.png)",
        "![Fusion gate vs epoch-equivalents](gate_vs_epochs.png)",
        "## Settings that differ between runs",
        "\n".join(f"- `{k}`: {', '.join(json.dumps(v, default=str) for v in vals)}"
                  for k, vals in settings.items()) or "None: all runs share their settings.",
        "## Runs compared",
        runs_markdown(runs),
        *(["Warnings:\n\n" + "\n".join(f"- {n}" for n in notes)] if notes else []),
        "## Skipped folders",
        "\n".join(f"- `{p}`: {reason}" for p, reason in skipped) or "None.",
    ]
    return "\n\n".join(parts) + "\n"


def comparison_csv(table: Comparison) -> str:
    """One row per arm; unknown values are empty cells."""
    fields = ["arm", "n_seeds", "seeds", "best_top1", "best_top1_std", "final_top1", "final_top1_std",
              "best_top5", "final_top5", "epochs_run"]
    fields += [f"epochs_to_{f * 100:g}pct" for f in table.fractions]
    fields += ["wall_time_s", "bytes_total", "bytes_per_round", "fusion_rounds", "teacher"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    for a in table.arms:
        values = [a.arm, a.n, " ".join(map(str, a.seeds)), a.best_top1, a.best_top1_std, a.final_top1,
                  a.final_top1_std, a.best_top5, a.final_top5, a.epochs_run, *a.epochs_to,
                  a.wall_time_s, a.bytes_total, a.bytes_per_round, a.fusion_rounds, a.teacher]
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


# --------------------------------------------------------------------------- entry points


@dataclass
class Report:
    """What build_report wrote: the report's path and the conclusion it states."""

    path: Path
    conclusion: str
    table: Comparison
    skipped: list[tuple[Path, str]]


def write_report(paths: Sequence[Path], out_dir: Path) -> Report:
    """Compare the runs found under ``paths``; write report.md, figures, JSON and CSV to out_dir."""
    runs, skipped = discover_runs(paths)
    if not runs:
        where = ", ".join(str(p) for p in paths)
        extra = f" ({len(skipped)} folder(s) skipped, e.g. {skipped[0][1]})" if skipped else ""
        raise UserError(f"no results found under {where}{extra}: run the experiment arms first "
                        f"(each run writes a folder with {SUMMARY_FILE} and {METRICS_FILE})")
    table = arm_table(runs)
    verdict = conclusion(table, runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_figures(group_by_arm(runs), table, out_dir)
    data = {**table.as_dict(), "conclusion": verdict, "differing_settings": differing_settings(runs),
            "runs": [str(r.path) for r in runs], "skipped": [[str(p), why] for p, why in skipped]}
    write_text(out_dir / "comparison.json", json.dumps(data, indent=2, default=str) + "\n")
    write_text(out_dir / "comparison.csv", comparison_csv(table))
    report = out_dir / "report.md"
    write_text(report, render_markdown(runs, skipped, table, verdict))
    return Report(path=report, conclusion=verdict, table=table, skipped=list(skipped))


def build_report(paths: Sequence[Path], out_dir: Path) -> Path:
    """Write the comparison into out_dir and return the path of report.md."""
    return write_report(paths, out_dir).path
