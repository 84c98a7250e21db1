"""The comparison suite: six arms with the same data, seed and budget of epochs, then the report.

Each MergeNet arm has a placebo: the same fusion from the teacher with its fused matrix
shuffled, so a gain can be credited to the teacher's knowledge only if the trained teacher
beats its placebo by more than the spread over seeds (see report.teacher_credit).
"""

from __future__ import annotations

from pathlib import Path

from ..checks import check_run
from ..config import FUSION_ARMS, RunConfig
from ..experiments.baseline import run_central, union_of_client_data
from ..experiments.estimate import Estimate, estimate_suite
from ..experiments.pretrain import ensure_teacher, teacher_data_config
from .federated import run_simulation


def run_suite(cfg: RunConfig, seeds: list[int], root: Path = Path("results/suite"), cotrain_teacher: bool = False,
              compare: bool = True, echo: bool = True) -> Path:
    """Run every arm for every seed under ``root/seed<k>/<arm>``; returns the report folder."""
    cfg = check_run(cfg, root, teacher=False)  # the teacher may still have to be pretrained
    if echo:
        print(suite_estimate(cfg, len(seeds)).describe(), flush=True)
    ensure_teacher(cfg, echo=echo)  # one teacher for every arm and seed: the comparison's constant
    for seed in seeds:
        folder = root / f"seed{seed}"
        for name in FUSION_ARMS:
            arm_cfg = cfg.replace(seed=seed).with_fusion_arm(name)
            arm_cfg = arm_cfg.replace(output_dir=str(folder / arm_cfg.central_arm))
            if echo:
                print(f"\n=== {arm_cfg.central_arm} (seed {seed}) -> {arm_cfg.output_dir}", flush=True)
            run_central(arm_cfg, mergenet=arm_cfg.fusion, cotrain_teacher=cotrain_teacher, echo=echo)
        # The federated arms one after another in one Flower run: one simulation start-up, not three.
        federated = cfg.replace(seed=seed, output_dir=str(folder), fusion_arms=" ".join(FUSION_ARMS))
        if echo:
            print(f"\n=== {', '.join(run.arm for run in federated.arm_runs())} (seed {seed}) -> {folder}", flush=True)
        run_simulation(federated, echo=echo)
    if not compare:
        return root
    from ..report import write_report

    report = write_report([root], root / "comparison")
    if echo:
        print(f"\nReport: {report.path}\n{report.conclusion}", flush=True)
    return report.path


def suite_estimate(cfg: RunConfig, seeds: int) -> Estimate:
    from ..data.splits import test_set, train_set

    teacher_images = 0
    if not cfg.random_teacher and not cfg.teacher_path().is_file():
        teacher_images = len(train_set(teacher_data_config(cfg)))
    return estimate_suite(cfg, seeds, train_images=len(union_of_client_data(cfg)), test_images=len(test_set(cfg)),
                          num_classes=train_set(cfg).num_classes, teacher_images=teacher_images)
