"""Finding run folders and grouping them by arm (the arms' order is the suite's, then others by name)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from fedmergenet.results import (
    ARMS,
    METRICS_FILE,
    SUMMARY_FILE,
    ResultsError,
    RunResult,
    read_run,
)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
        if not is_number(summary[key]):
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
