"""The comparison's numbers, all computed from the run folders: per-arm means and spreads over
seeds, convergence thresholds as fractions of the best arm's mean final top-1, differing settings."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from fedmergenet.results import (
    RunResult,
)

from .runs import group_by_arm, is_number

FRACTIONS = (0.5, 0.75, 0.9, 0.95)
NA = "n/a"

# Config keys that name where or under what name a run was written: they always differ
# between runs and say nothing about the experiment. Compared after "-" -> "_".
IGNORED_SETTINGS = frozenset(
    {"out", "out_dir", "output", "output_dir", "results_dir", "result_dir", "run_dir",
     "run_name", "name", "log_dir", "logdir", "resume"}
)


def _mean(values: Sequence[Any]) -> float | None:
    """Mean over seeds; None unless every run recorded the value (a subset's mean would mislead)."""
    if not values or not all(is_number(v) for v in values):
        return None
    return statistics.fmean(float(v) for v in values)


def _std(values: Sequence[float]) -> float | None:
    """Sample standard deviation over seeds; None for a single seed (no spread known)."""
    return statistics.stdev(values) if len(values) > 1 else None


def thresholds(best_final: float, fractions: Sequence[float] = FRACTIONS) -> list[float]:
    """Top-1 levels to time convergence against, relative to the best final top-1 compared."""
    return [best_final * f for f in fractions]


def sorted_rows(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(epoch_equiv, value) pairs in epoch order, leaving out rows where the value is null."""
    pairs = [(float(r["epoch_equiv"]), float(r[key])) for r in rows
             if is_number(r.get("epoch_equiv")) and is_number(r.get(key))]
    return sorted(pairs)


def epochs_to_reach(rows: Sequence[dict[str, Any]], threshold: float) -> float | None:
    """First epoch-equivalent at which test top-1 >= threshold; None if it never does."""
    for epoch, top1 in sorted_rows(rows, "test_top1"):
        if top1 >= threshold:
            return epoch
    return None


def _summary_number(run: RunResult, key: str) -> float | None:
    """A number every summary carries (wall time, traffic, fusions); None where it is not one."""
    value = run.summary.get(key)
    return float(value) if is_number(value) else None


def _teacher_source(runs: Sequence[RunResult]) -> str:
    sources = []
    for run in runs:
        teacher = run.summary.get("teacher")
        source = teacher.get("source") if isinstance(teacher, dict) else None
        if source and str(source) not in sources:
            sources.append(str(source))
    return "/".join(sources) if sources else NA


def teachers_used(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Each teacher the arms fused from, as its checkpoint recorded it (a placebo arm's is the
    checkpoint it shuffled), and the arms that used it: what a gap between two arms says about
    a teacher depends on which one they fused from."""
    used: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        teacher = run.summary.get("teacher")
        if not isinstance(teacher, dict) or teacher.get("source") in (None, "none"):
            continue  # an arm that does not fuse
        source = "random" if teacher.get("source") == "random" else "checkpoint"
        fields = {"source": source, "path": teacher.get("path"), "epochs": teacher.get("epochs"),
                  "test_top1": teacher.get("test_top1")}
        entry = used.setdefault(tuple(fields.values()), {**fields, "arms": []})
        if run.arm not in entry["arms"]:
            entry["arms"].append(run.arm)
    return list(used.values())


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
    last_epochs = [max((e for e, _ in sorted_rows(r.rows, "epoch_equiv")), default=None) for r in runs]
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
        wall_time_s=_mean([_summary_number(r, "wall_time_s") for r in runs]),
        bytes_total=_mean([_summary_number(r, "bytes_total") for r in runs]),
        bytes_per_round=_mean([_summary_number(r, "bytes_per_round") for r in runs]),
        fusion_rounds=_mean([_summary_number(r, "fusion_rounds") for r in runs]),
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
