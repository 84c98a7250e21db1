"""The comparison suite: four arms with the same data, seed and budget of epochs, then the report."""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from .baseline import run_central
from .federated import run_simulation
from .teacher import ensure_teacher

SUITE_ARMS = ("central", "central_mergenet", "fedavg", "fedavg_mergenet")


def run_suite(cfg: RunConfig, seeds: list[int], root: Path = Path("results/suite"), cotrain_teacher: bool = False,
              compare: bool = True, echo: bool = True) -> Path:
    """Run every arm for every seed under ``root/seed<k>/<arm>``; returns the report folder."""
    ensure_teacher(cfg, echo=echo)  # one teacher for every arm and seed: the comparison's constant
    for seed in seeds:
        for arm in SUITE_ARMS:
            arm_cfg = cfg.replace(seed=seed, output_dir=str(root / f"seed{seed}" / arm), fusion=arm.endswith("mergenet"))
            if echo:
                print(f"\n=== {arm} (seed {seed}) -> {arm_cfg.output_dir}", flush=True)
            if arm.startswith("central"):
                run_central(arm_cfg, mergenet=arm_cfg.fusion, cotrain_teacher=cotrain_teacher, echo=echo)
            else:
                run_simulation(arm_cfg, echo=echo)
    if not compare:
        return root
    from ..report import write_report

    report = write_report([root], root / "comparison")
    if echo:
        print(f"\nReport: {report.path}\n{report.conclusion}", flush=True)
    return report.path
