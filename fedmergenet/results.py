"""The results format: one module writes it, every reader (report, resume, tests) reads it here.

A run folder holds:
- ``metrics.jsonl``: one JSON object per round (federated arms) or epoch (central arms),
  appended as each ends, so a crashed run keeps its history;
- ``summary.json``: what the run was (arm, config, teacher, versions) and how it ended.

Accuracies are fractions in [0, 1]. ``epoch_equiv`` counts passes over the training data
(rounds x local epochs for the federated arms), so arms compare on the same axis.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text
from .config import DP_MODES, STRATEGIES

ARMS = ("central", "central_mergenet", "central_placebo", "fedavg", "fedavg_mergenet", "fedavg_placebo")
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

# Keys every metrics row carries; the report relies on them.
ROW_KEYS = ("epoch_equiv", "test_top1", "test_top5", "test_loss", "fusion_applied", "wall_time_s")
SUMMARY_KEYS = ("arm", "best_top1", "final_top1", "config")


def split_arm(name: str) -> tuple[str, str]:
    """An arm's name as RunConfig.arm and the central baseline build it: its aggregation
    (``central``, a strategy, a strategy with its DP mode) and its fusion (``""``, ``"mergenet"``
    or ``"placebo"``)."""
    aggregation, _, fusion = name.partition("_")
    return aggregation, fusion


def known_arm(name: str) -> bool:
    aggregation, fusion = split_arm(name)
    if fusion not in ("", "mergenet", "placebo"):
        return False
    strategy, dp, mode = aggregation.partition("-dp-")
    return aggregation == "central" or (strategy in STRATEGIES and (not dp or mode in DP_MODES[1:]))


def placebo_of(arm: str) -> str | None:
    """A MergeNet arm's control (``fedadam_mergenet`` -> ``fedadam_placebo``): the same fusion
    from a teacher whose fused matrix is shuffled; None for other arms."""
    aggregation, fusion = split_arm(arm)
    return f"{aggregation}_placebo" if fusion == "mergenet" else None


class ResultsError(ValueError):
    """A run folder whose files are missing or do not follow the format."""


def _clean(value: Any) -> Any:
    """JSON has no NaN or Inf: write them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one round's (or epoch's) metrics as a JSON line and flush it to disk."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(_clean(row), sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def rewrite_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Replace the metrics file with exactly these rows (used when resuming)."""
    text = "".join(json.dumps(_clean(r), sort_keys=True) + "\n" for r in rows)
    write_text(run_dir / METRICS_FILE, text)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Read every complete row; a torn last line (a crash mid-write) is dropped."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ResultsError(f"{path} is missing")
    rows: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ResultsError(f"{path}:{number} is not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ResultsError(f"{path}:{number} is not a JSON object")
        rows.append(row)
    return rows


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_text(run_dir / SUMMARY_FILE, json.dumps(_clean(summary), indent=2, sort_keys=True) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        raise ResultsError(f"{path} is missing")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path} is not JSON ({exc.msg})") from exc
    if not isinstance(summary, dict):
        raise ResultsError(f"{path} is not a JSON object")
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise ResultsError(f"{path} lacks {', '.join(missing)}")
    if not known_arm(str(summary["arm"])):
        raise ResultsError(f"{path} names an unknown arm {summary['arm']!r}")
    return summary


@dataclass
class RunResult:
    """A run folder read back: its summary and its rows."""

    path: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def arm(self) -> str:
        return str(self.summary["arm"])

    @property
    def seed(self) -> int:
        return int(self.summary.get("config", {}).get("seed", 0))


def read_run(run_dir: Path) -> RunResult:
    """Read and check one run folder; raises ResultsError saying what is wrong."""
    summary = read_summary(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ResultsError(f"{run_dir / METRICS_FILE} has no rows")
    for number, row in enumerate(rows, start=1):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ResultsError(f"{run_dir / METRICS_FILE} row {number} lacks {', '.join(missing)}")
    return RunResult(path=run_dir, summary=summary, rows=rows)


def metrics_row(*, epoch_equiv: int, top1: float, top5: float, loss: float, wall_time_s: float,
                **fields: Any) -> dict[str, Any]:
    """One row of ``metrics.jsonl``: what every arm records after an epoch or round (fusion
    and traffic default to none), then what only its kind of arm has."""
    return {
        "epoch_equiv": epoch_equiv,
        "test_top1": top1,
        "test_top5": top5,
        "test_loss": loss,
        "fusion_applied": 0,
        "fusion_skipped": 0,
        "adapter_loss": None,
        "gate": None,
        "fusion_shift": None,
        "layer_std": None,
        "bytes_down": 0,
        "bytes_up": 0,
        "wall_time_s": wall_time_s,
        **fields,
    }


def summarize(rows: list[dict[str, Any]], *, arm: str, status: str, wall_time_s: float, config: dict[str, Any],
              teacher: dict[str, Any] | None, error: str | None = None, **extra: Any) -> dict[str, Any]:
    """The summary of a run from its metrics rows (the first describes the initial model), the
    same for central and federated arms; ``extra`` holds what only one kind of arm has."""
    done = [r for r in rows if r["epoch_equiv"] > 0]
    bytes_total = sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in done)
    return {
        "arm": arm,
        "status": status,
        "error": error,
        "epoch_equiv": done[-1]["epoch_equiv"] if done else 0,
        "best_top1": max((r["test_top1"] for r in rows), default=None),
        "final_top1": rows[-1]["test_top1"] if rows else None,
        "best_top5": max((r["test_top5"] for r in rows), default=None),
        "final_top5": rows[-1]["test_top5"] if rows else None,
        "fusion_rounds": sum(r["fusion_applied"] for r in done),
        "fusion_skipped": sum(r.get("fusion_skipped", 0) for r in done),
        "bytes_total": bytes_total,
        "bytes_per_round": bytes_total / len(done) if done else 0,
        "wall_time_s": wall_time_s,
        "teacher": teacher or {"source": "none"},
        "config": config,
        "versions": library_versions(),
        **extra,
    }


# A round's train exchange along its last reply (flower.wire.ExchangeParts): out to the client,
# the client's side (its function within), back to the server, the server's unpacking; each
# field of ExchangeParts and the row's name for it.
EXCHANGE_FIELDS = {"dispatch_s": "train_dispatch_s", "client_s": "train_last_client_s",
                   "function_s": "train_last_function_s", "return_s": "train_return_s", "unpack_s": "train_unpack_s"}


def round_times(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Where a federated run's rounds spent their time, as medians over the rounds whose span is
    known (a round spans from its train messages going out to the next round's): the span, the
    slowest client's own training and BatchNorm recalibration, the slowest client's whole train
    function (model set-up and the copy back included), the train phase's exchange (messages out
    to the last reply in: beyond that client's function it is Flower's and the messages', or the
    server's evaluation of the round before where that outlasts the clients; the span beyond the
    exchange is the server's work, of which its wait for the previous round's resumable state to
    reach the disk), and the span over that training (what is not
    training shows as the excess over 1). A resumed run's clock starts again, so the round before
    a resume has no span."""
    timed = [(r, later["round_start_s"] - r["round_start_s"]) for r, later in zip(rows, rows[1:])
             if r.get("round_start_s") is not None and later.get("round_start_s") is not None
             and r.get("slowest_client_train_s")]
    timed = [(r, span) for r, span in timed if span > 0]
    if not timed:
        return None

    def known(key: str) -> float | None:
        values = [r[key] for r, _ in timed if r.get(key) is not None]
        return statistics.median(values) if values else None  # older rows lack the newer timings

    return {
        "rounds": len(timed),
        "span_s": statistics.median(span for _, span in timed),
        "slowest_train_s": statistics.median(r["slowest_client_train_s"] for r, _ in timed),
        "slowest_recalibrate_s": statistics.median(r.get("slowest_client_recalibrate_s") or 0.0 for r, _ in timed),
        "slowest_client_total_s": known("slowest_client_total_s"),
        "train_exchange_s": known("train_exchange_s"),
        **{key: known(key) for key in EXCHANGE_FIELDS.values()},
        "state_wait_s": None if (wait := known("state_wait_ms")) is None else wait / 1000,
        "span_over_training": statistics.median(span / r["slowest_client_train_s"] for r, span in timed),
    }


def library_versions() -> dict[str, str]:
    """Versions that decide whether two runs are comparable (torch's with its build, such as
    +cu130). The others are read from their metadata: the central arms run without importing
    Flower, and importing torchvision would cost every run seconds of CPU for one string."""
    from importlib import metadata

    import numpy
    import torch

    def installed(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": installed("torchvision"),
            "flwr": installed("flwr"), "numpy": numpy.__version__}
