"""report.md and comparison.csv, written from the numbers and the verdict."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

from fedmergenet.results import (
    RunResult,
)

from .numbers import NA, Comparison, differing_settings, teachers_used
from .runs import arm_order, duplicate_seeds


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


def teacher_markdown(teachers: Sequence[dict[str, Any]]) -> str:
    """What each fusing arm fused from, as the checkpoint recorded it."""
    if not teachers:
        return "No arm fused."
    lines = []
    for t in teachers:
        arms = ", ".join(t["arms"])
        if t["source"] == "random":
            lines.append(f"- an untrained stand-in (`--random-teacher`), a smoke test with no knowledge to "
                         f"transfer: {arms}")
            continue
        epochs = NA if t["epochs"] is None else f"{t['epochs']} epoch(s)"
        lines.append(f"- `{t['path']}`: pretrained for {epochs}, test top-1 {_pct(t['test_top1'])} %: {arms}")
    note = ("\n\nThe arms fused from different teachers: a gap between them is not about one teacher."
            if len(teachers) > 1 else "")
    return ("The teacher checkpoint each fusing arm fused from, as the checkpoint recorded it (a placebo arm "
            "fused from the same one with its `fc.weight` shuffled):\n\n" + "\n".join(lines) + note)


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
        "## Teacher",
        teacher_markdown(teachers_used(runs)),
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
