"""The conclusion in words, from the numbers: gaps against the spread over seeds, the trained
teacher against its placebo and each strategy against FedAvg, paired by seed, with a 95 %
confidence interval of the mean paired gap."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from fedmergenet.results import RunResult, placebo_of, split_arm

from .numbers import ArmStats, Comparison
from .runs import arm_order


def paired_gaps(runs: Sequence[RunResult], arm: str, control: str) -> dict[int, float]:
    """Final top-1 of ``arm`` minus ``control``, seed by seed (same seed: same start and data order)."""
    finals = {(r.arm, r.seed): float(r.summary["final_top1"]) for r in runs}
    seeds = sorted(s for a, s in finals if a == arm and (control, s) in finals)
    return {s: finals[(arm, s)] - finals[(control, s)] for s in seeds}


# Student's t, two-sided 95 %, for 1..30 degrees of freedom; beyond, 1.96 + 2.4 / df is within
# 0.002 of it.
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
          2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
          2.045, 2.042)


def t_975(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("Student's t needs at least one degree of freedom")
    return _T_975[df - 1] if df <= len(_T_975) else 1.96 + 2.4 / df


@dataclass(frozen=True)
class PairedGap:
    """``arm`` minus ``control`` in pp: the mean over paired seeds, its spread (sample std of
    the per-seed gaps) and the half-width of the mean's 95 % confidence interval (Student's t);
    both None with one seed. Two or three seeds give wide intervals: the std of the gaps alone
    would credit a gain about one standard error above zero."""

    mean: float
    spread: float | None
    half_width: float | None
    seeds: list[int]

    @property
    def interval(self) -> str:
        return f"95% interval {self.mean - self.half_width:+.1f} to {self.mean + self.half_width:+.1f} pp"

    @property
    def excludes_zero(self) -> bool:
        return self.half_width is not None and abs(self.mean) > self.half_width


def paired_gap(runs: Sequence[RunResult], arm: str, control: str) -> PairedGap | None:
    gaps = paired_gaps(runs, arm, control)
    if not gaps:
        return None
    n = len(gaps)
    spread = statistics.stdev(gaps.values()) * 100 if n > 1 else None
    half_width = t_975(n - 1) * spread / math.sqrt(n) if spread is not None else None
    return PairedGap(statistics.fmean(gaps.values()) * 100, spread, half_width, list(gaps))


def _no_clear_reason(a: ArmStats, b: ArmStats, runs: Sequence[RunResult] = ()) -> str | None:
    """Why the gap between two arms is not a clear difference, or None if it is. Arms run on two
    or more common seeds are judged like the placebo question, by the paired gaps' interval;
    without the runs, by the spread and the ranges of their seeds."""
    single = [x.arm for x in (a, b) if x.n < 2]
    if len(single) == 2:
        return "one seed per arm, so the spread over seeds is unknown"
    if single:
        return f"{single[0]} has one seed, so its spread over seeds is unknown"
    gap = paired_gap(runs, a.arm, b.arm) if runs else None
    if gap is not None and gap.half_width is not None:
        return None if gap.excludes_zero else f"paired over seeds, {gap.interval}, which includes zero"
    distance = abs(a.final_top1 - b.final_top1)
    spread = max(a.final_top1_std or 0.0, b.final_top1_std or 0.0)
    if distance <= spread:
        return f"gap within the seeds' spread (std up to {spread * 100:.1f} pp)"
    low, high = (a, b) if a.final_top1 < b.final_top1 else (b, a)
    if low.final_top1_max >= high.final_top1_min:
        return "the seeds' ranges overlap"
    return None


def _verdict(a: ArmStats, b: ArmStats, runs: Sequence[RunResult] = ()) -> str:
    reason = _no_clear_reason(a, b, runs)
    return "a clear difference" if reason is None else f"no clear difference ({reason})"


def _fed_vs_central(table: Comparison, runs: Sequence[RunResult] = ()) -> str | None:
    """The question the project asks: does federated MergeNet keep up with central MergeNet?"""
    fed, cen = table.arm("fedavg_mergenet"), table.arm("central_mergenet")
    if fed is None or cen is None:
        return None
    diff = (fed.final_top1 - cen.final_top1) * 100
    question = "Does fedavg_mergenet match or beat central_mergenet?"
    reason = _no_clear_reason(fed, cen, runs)
    if reason is None:
        answer = (f"yes, it beats it by {diff:.1f} pp" if diff > 0
                  else f"no, it is {-diff:.1f} pp lower")
        return f"{question} {answer} (a clear difference)."
    if fed.n < 2 or cen.n < 2:
        return f"{question} cannot tell: {diff:+.1f} pp, no clear difference ({reason})."
    # Not a claim of equivalence: with a few seeds the interval is wide.
    return f"{question} no clear difference either way: {diff:+.1f} pp ({reason})."


def teacher_credit(runs: Sequence[RunResult], arm: str) -> str | None:
    """Does the trained teacher beat its placebo? Credited only when the 95 % confidence interval
    of the mean paired gap over seeds lies above zero."""
    control = placebo_of(arm)
    gap = paired_gap(runs, arm, control) if control else None
    if gap is None:
        return None
    mean = gap.mean
    question = f"Does the trained teacher help {arm} beyond its placebo {control}?"
    if gap.spread is None:
        return (f"{question} cannot tell: {mean:+.1f} pp on one paired seed, so the spread over seeds is "
                "unknown and nothing is credited to the teacher.")
    seeds = ", ".join(map(str, gap.seeds))
    detail = f"{mean:+.1f} pp, paired over seeds {seeds}, spread (std of the gaps) {gap.spread:.1f} pp, {gap.interval}"
    if gap.excludes_zero and mean > 0:
        return (f"{question} yes: {detail}; the interval lies above zero, so the gain is credited to the "
                "teacher's knowledge.")
    if gap.excludes_zero:
        return f"{question} no, it hurts: {detail}; the trained teacher does worse than its placebo."
    return (f"{question} not shown: {detail}; the interval includes zero, so no gain can be credited to "
            "the teacher (what fusion does here, perturbation may do as well).")


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
             f"({runner.final_top1 * 100:.1f}%): {_verdict(best, runner, runs)}."]
    for other in ranked[2:]:
        gap = (best.final_top1 - other.final_top1) * 100
        lines.append(f"{best.arm} vs {other.arm} ({other.final_top1 * 100:.1f}%): "
                     f"{gap:.1f} pp above, {_verdict(best, other, runs)}.")
    answer = _fed_vs_central(table, runs)
    if answer:
        lines.append(answer)
    arms = arm_order({r.arm for r in runs})
    lines += [line for arm in arms if (line := teacher_credit(runs, arm))]
    lines += [line for arm in arms if (line := strategy_difference(runs, arm))]
    return "\n".join(lines)


def strategy_difference(runs: Sequence[RunResult], arm: str) -> str | None:
    """A federated arm against the FedAvg arm with the same fusion: runs that differ only in the
    server strategy (or DP), paired by seed; a difference counts when the 95 % confidence
    interval of the mean paired gap excludes zero."""
    aggregation, fusion = split_arm(arm)
    if aggregation in ("central", "fedavg"):
        return None
    control = "fedavg" + (f"_{fusion}" if fusion else "")
    gap = paired_gap(runs, arm, control)
    if gap is None:
        return None
    head = f"{arm} vs {control} (only the strategy differs): {gap.mean:+.1f} pp"
    if gap.spread is None:
        return f"{head} on one paired seed; the spread over seeds is unknown, so no difference is claimed."
    verdict = "a clear difference" if gap.excludes_zero else "the interval includes zero, no clear difference"
    return (f"{head}, paired over seeds {', '.join(map(str, gap.seeds))}, spread {gap.spread:.1f} pp, "
            f"{gap.interval}: {verdict}.")
