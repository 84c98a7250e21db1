"""The comparison report: reads run folders, compares the arms, writes figures and report.md.

Every number in the report is computed from the run folders (through ``fedmergenet.results``),
never from constants: convergence thresholds are fractions of the best arm's mean final top-1,
and the conclusion is worded from the gaps and the spread over seeds. One module per job:
runs (finding and grouping), numbers, verdict, figures, markdown; this one writes them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fedmergenet.atomic import write_text
from fedmergenet.errors import UserError
from fedmergenet.results import METRICS_FILE, SUMMARY_FILE

from .figures import write_figures
from .markdown import comparison_csv, render_markdown
from .numbers import Comparison, arm_table, differing_settings, teachers_used
from .runs import discover_runs, group_by_arm
from .verdict import conclusion


@dataclass
class Report:
    """What write_report wrote: the report's path and the conclusion it states."""

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
            "teachers": teachers_used(runs),
            "runs": [str(r.path) for r in runs], "skipped": [[str(p), why] for p, why in skipped]}
    write_text(out_dir / "comparison.json", json.dumps(data, indent=2, default=str) + "\n")
    write_text(out_dir / "comparison.csv", comparison_csv(table))
    report = out_dir / "report.md"
    write_text(report, render_markdown(runs, skipped, table, verdict))
    return Report(path=report, conclusion=verdict, table=table, skipped=list(skipped))

