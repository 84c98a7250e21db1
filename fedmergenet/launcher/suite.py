"""The comparison suite: six arms with the same data, seed and budget of epochs, then the report.

Each MergeNet arm has a placebo: the same fusion from the teacher with its fused matrix
shuffled, so a gain can be credited to the teacher's knowledge only if the trained teacher
beats its placebo beyond the 95 % confidence interval of the paired gaps over seeds
(see report.teacher_credit).

The arms are independent once the teacher exists, so the suite runs them as separate
processes of the runner script, ``jobs`` at a time: one at a time they take this terminal,
side by side each writes its own log (on a GPU that overlaps start-ups and evaluation; one
arm's recorded training step already keeps the card busy). A missing teacher is pretrained
first, one at a time; side by side, beside the first arms, which wait for it only when they
load it: a federated run's plain FedAvg arm comes first and needs none, and its start-up
(Ray, the actors, their first CUDA work) leaves the card to the teacher. How the wall time
split goes to ``<root>/timing.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text
from ..checks import check_run, writable_dir
from ..config import FUSION_ARMS, PROJECT_ROOT, RunConfig, to_flags, validate
from ..errors import ConfigError
from ..experiments.estimate import Estimate, estimate_suite
from ..experiments.pretrain import teacher_data_config
from . import processes

RUNNER = PROJECT_ROOT / "run_federated_mergenet.py"


@dataclass(frozen=True)
class Unit:
    """One independent piece of the suite: the teacher's pretraining, a central arm, or a seed's
    three federated arms one after another in one Flower run (one simulation start-up, not three)."""

    name: str  # teacher, seed0/federated, seed0/central_mergenet
    cfg: RunConfig
    kind: str  # "teacher", "federated" or "central"
    cotrain_teacher: bool = False
    beside: bool = False  # runs beside the others, not in one of the ``jobs`` places

    def command(self) -> list[str]:
        """The runner's command line that runs this unit: the suite's arms are the runner's."""
        mode = {"teacher": ["--pretrain-teacher"], "federated": [],
                "central": ["--central"] + (["--cotrain-teacher"] if self.cotrain_teacher else [])}[self.kind]
        return [sys.executable, str(RUNNER), *mode, *to_flags(self.cfg)]

    def log_path(self, root: Path) -> Path:
        return root / f"{self.name}.log"

    def describe(self) -> str:
        if self.kind == "teacher":
            return (f"teacher: pretraining the missing {self.cfg.teacher_path()} ({self.cfg.teacher_epochs} "
                    f"epoch(s) on {self.cfg.dataset})" + (", beside the arms" if self.beside else ""))
        return f"{self.name} -> {self.cfg.output_dir}"


def suite_units(cfg: RunConfig, seeds: list[int], root: Path, cotrain_teacher: bool = False,
                jobs: int = 1) -> list[Unit]:
    """A missing teacher's pretraining, every seed's federated run, then every seed's three
    central arms: longest first, so that units side by side end together instead of the last
    seed's federated run (three arms long) starting when the others are nearly done and running
    on alone. Side by side the teacher runs beside the first ``jobs`` arms, which wait for it."""
    teacher = []
    if cfg.teacher_missing:
        teacher = [Unit("teacher", cfg, "teacher", beside=jobs > 1)]
        cfg = cfg.replace(await_teacher=jobs > 1)
    federated, central = [], []
    for seed in seeds:
        folder = root / f"seed{seed}"
        arms = cfg.replace(seed=seed, output_dir=str(folder), fusion_arms=" ".join(FUSION_ARMS))
        federated.append(Unit(f"seed{seed}/federated", arms, "federated"))
        for name in FUSION_ARMS:
            arm = cfg.replace(seed=seed).with_fusion_arm(name)
            arm = arm.replace(output_dir=str(folder / arm.central_arm))
            central.append(Unit(f"seed{seed}/{arm.central_arm}", arm, "central", cotrain_teacher=cotrain_teacher))
    return teacher + federated + central


def run_suite(cfg: RunConfig, seeds: list[int], root: Path = Path("results/suite"), cotrain_teacher: bool = False,
              compare: bool = True, echo: bool = True, jobs: int = 1) -> Path:
    """Run every arm for every seed under ``root/seed<k>/<arm>``; returns the report folder."""
    began = time.monotonic()  # the command's clock: its checks and estimate count too
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {jobs})")
    if len(set(seeds)) != len(seeds):
        # The report pairs arms by seed: a seed twice would run into its own results folders.
        raise ConfigError(f"--seeds must differ from one another (got {' '.join(map(str, seeds))})")
    for seed in seeds:
        validate(cfg.replace(seed=seed))  # each seed's runs, checked before any of them starts
    cfg = check_run(cfg, root, teacher=False)  # the teacher may still have to be pretrained
    pretrain = cfg.teacher_missing
    if pretrain:  # before arms start beside its pretraining
        writable_dir(cfg.teacher_path().parent, "teacher checkpoint folder")
    if echo:
        beside = ", the teacher's pretraining beside them" if pretrain else ""
        side = f" (one arm at a time: {jobs} side by side take less{beside})" if jobs > 1 else ""
        print(suite_estimate(cfg, len(seeds)).describe() + side, flush=True)
    # One teacher for every arm and seed (the comparison's constant); the runner's processes
    # share this folder.
    units = suite_units(cfg, seeds, root, cotrain_teacher, jobs)
    timing = {"jobs": jobs, "before_units_s": time.monotonic() - began}
    timing["units"] = run_units(units, root, jobs, echo, since=began)
    timing["total_s"] = time.monotonic() - began
    write_text(root / "timing.json", json.dumps(timing, indent=1) + "\n")
    if echo:
        print(describe_timing(timing), flush=True)
    if not compare:
        return root
    from ..report import write_report

    report = write_report([root], root / "comparison")
    if echo:
        print(f"\nReport: {report.path}\n{report.conclusion}", flush=True)
    return report.path


def run_units(units: list[Unit], root: Path, jobs: int, echo: bool,
              since: float | None = None) -> dict[str, dict[str, float]]:
    """Run the units ``jobs`` at a time (those ``beside`` the others in addition), in order; the
    first that fails stops the others. Returns each unit's start and wall seconds; starts and
    the lines it prints count from ``since`` (``time.monotonic()``; default: the first start),
    so that a suite stopped before its end still tells from its log how its time went."""
    # Side by side, the cores are shared out: torch would otherwise give every process all of them.
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if jobs > 1 else {})
    pending, running, done = list(units), {}, {}
    first = time.monotonic() if since is None else since
    with processes.managed() as children:
        while pending or running:
            while pending and (pending[0].beside or sum(not u.beside for u, _, _ in running.values()) < jobs):
                unit = pending.pop(0)
                log = unit.log_path(root) if jobs > 1 or not echo else None  # None: this terminal
                if echo:
                    print(f"\n=== {unit.describe()}" + (f" (log: {log})" if log else "")
                          + f" at {time.monotonic() - first:.0f} s", flush=True)
                running[unit.name] = (unit, children.start(unit.command(), log, env), time.monotonic())
            time.sleep(0.2)
            for unit, process, started in list(running.values()):
                if process.poll() is None:
                    continue
                del running[unit.name]
                if process.returncode != 0:
                    raise processes.RuntimeFailure(f"{unit.name} failed (exit code {process.returncode}): "
                                                   f"{last_line(unit.log_path(root))}")
                done[unit.name] = {"start_s": started - first, "seconds": time.monotonic() - started}
                if echo and jobs > 1:
                    print(f"=== {unit.name} done in {done[unit.name]['seconds']:.0f} s "
                          f"(at {time.monotonic() - first:.0f} s)", flush=True)
    return done


def last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "see its output above"
    return f"{lines[-1].strip() if lines else '(no output)'}; log: {log}"


def describe_timing(timing: dict) -> str:
    """How the suite's wall time split: the teacher's pretraining, and the arms' process time
    (central and federated summed)."""
    units = timing["units"]
    federated = sum(u["seconds"] for name, u in units.items() if name.endswith("/federated"))
    central = sum(u["seconds"] for name, u in units.items() if name != "teacher") - federated
    teacher = f"teacher pretrained in {units['teacher']['seconds']:.0f} s; " if "teacher" in units else ""
    return (f"\nsuite: {timing['total_s']:.0f} s wall, {timing['jobs']} at a time (checks and estimate "
            f"{timing['before_units_s']:.0f} s); {teacher}process time of the federated runs {federated:.0f} s "
            f"and of the central arms {central:.0f} s")


def suite_estimate(cfg: RunConfig, seeds: int) -> Estimate:
    from ..data.splits import test_set, train_set
    from ..experiments.baseline import union_of_client_data

    teacher_images = 0
    if cfg.teacher_missing:
        teacher_images = len(train_set(teacher_data_config(cfg)))
    return estimate_suite(cfg, seeds, train_images=len(union_of_client_data(cfg)), test_images=len(test_set(cfg)),
                          num_classes=train_set(cfg).num_classes, teacher_images=teacher_images)
