"""The comparison report, on small run folders written here with the results writers.

Fixture (accuracies as fractions, one row per epoch / round):

    arm               seed  test top-1 per row          epoch_equiv
    central           0     .30 .50 .60 .70             1 2 3 4
    central           1     .40 .55 .66 .62             1 2 3 4
    central_mergenet  0     .40 .60 .75 .80             1 2 3 4
    central_mergenet  1     .42 .62 .76 .78             1 2 3 4
    fedavg            0     .20 .45 .60 .68             2 4 6 8   (4 rounds x 2 local epochs)
    fedavg_mergenet   0     .25 .50 .66 .74             2 4 6 8   (fusion in rounds 1 and 3)

Best arm mean final top-1 is central_mergenet's (.80 + .78) / 2 = .79, so the thresholds are
.5/.75/.9/.95 x .79 = .395 / .5925 / .711 / .7505.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from fedmergenet.errors import UserError
from fedmergenet.report import write_report
from fedmergenet.report.figures import FIGURES
from fedmergenet.report.markdown import teacher_markdown
from fedmergenet.report.numbers import arm_table, differing_settings, epochs_to_reach, teachers_used, thresholds
from fedmergenet.report.runs import discover_runs, group_by_arm
from fedmergenet.report.verdict import conclusion, t_975
from fedmergenet.results import RunResult, append_metrics, known_arm, write_summary

REPO = Path(__file__).resolve().parents[1]

CENTRAL_ROWS = {
    ("central", 0): [0.30, 0.50, 0.60, 0.70],
    ("central", 1): [0.40, 0.55, 0.66, 0.62],
    ("central_mergenet", 0): [0.40, 0.60, 0.75, 0.80],
    ("central_mergenet", 1): [0.42, 0.62, 0.76, 0.78],
}
FEDERATED_ROWS = {
    ("fedavg", 0): [0.20, 0.45, 0.60, 0.68],
    ("fedavg_mergenet", 0): [0.25, 0.50, 0.66, 0.74],
}


def rows_for(arm: str, top1: list[float]) -> list[dict]:
    """Metrics rows as the runners write them: epochs for central, rounds of 2 local epochs else."""
    federated = arm.startswith("fedavg")
    rows = []
    for i, acc in enumerate(top1, start=1):
        row = {"epoch_equiv": 2.0 * i if federated else float(i), "test_top1": acc,
               "test_top5": min(1.0, acc + 0.2), "test_loss": 3.0 - 3.0 * acc,
               "wall_time_s": 10.0 * i}
        if federated:
            fused = arm.endswith("mergenet") and i % 2 == 1
            row.update(round=i, fusion_applied=int(fused), bytes_down=1000, bytes_up=500)
        else:
            row.update(epoch=i, fusion_applied=3 if arm.endswith("mergenet") else 0)
        rows.append(row)
    return rows


def summary_for(arm: str, seed: int, top1: list[float]) -> dict:
    federated = arm.startswith("fedavg")
    config = {"seed": seed, "dataset": "cifar100", "out": f"results/{arm}_s{seed}",
              "run-name": f"{arm}_s{seed}"}
    config.update({"rounds": 4, "local-epochs": 2} if federated else {"epochs": 4})
    summary = {"arm": arm, "config": config, "best_top1": max(top1), "final_top1": top1[-1],
               "best_top5": min(1.0, max(top1) + 0.2), "final_top5": min(1.0, top1[-1] + 0.2),
               "wall_time_s": 40.0, "status": "completed", "run_name": f"{arm}_s{seed}"}
    if arm.endswith("mergenet"):
        summary["teacher"] = {"source": "checkpoint", "path": "checkpoints/resnet50.pt", "epochs": 200,
                              "test_top1": 0.77, "sha256": "0" * 64}
    if federated:
        summary.update(bytes_total=6000, bytes_per_round=1500,
                       fusion_rounds=2 if arm.endswith("mergenet") else 0)
    return summary


def write_run(run_dir: Path, arm: str, seed: int, top1: list[float]) -> Path:
    for row in rows_for(arm, top1):
        append_metrics(run_dir, row)
    write_summary(run_dir, summary_for(arm, seed, top1))
    return run_dir


def make_run(arm: str, seed: int, top1: list[float]) -> RunResult:
    """An in-memory run, for the pure functions."""
    return RunResult(path=Path(f"{arm}_s{seed}"), summary=summary_for(arm, seed, top1),
                     rows=rows_for(arm, top1))


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All six runs, plus a crashed run (metrics, no summary) and a corrupt summary."""
    root = tmp_path_factory.mktemp("results")
    for (arm, seed), top1 in {**CENTRAL_ROWS, **FEDERATED_ROWS}.items():
        write_run(root / f"{arm}_s{seed}", arm, seed, top1)
    append_metrics(root / "crashed", rows_for("fedavg", [0.1])[0])
    corrupt = root / "nested" / "corrupt"
    append_metrics(corrupt, rows_for("central", [0.1])[0])
    (corrupt / "summary.json").write_text("{not json", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def report(results_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return write_report([results_dir], tmp_path_factory.mktemp("comparison"))


def all_runs() -> list[RunResult]:
    return [make_run(arm, seed, top1) for (arm, seed), top1 in {**CENTRAL_ROWS, **FEDERATED_ROWS}.items()]


# ----------------------------------------------------------------- pure functions


def test_thresholds_are_fractions_of_the_best_final() -> None:
    assert thresholds(0.8) == pytest.approx([0.4, 0.6, 0.72, 0.76])
    assert thresholds(0.5, fractions=(0.5, 1.0)) == pytest.approx([0.25, 0.5])


def test_epochs_to_reach_is_the_first_epoch_at_or_above_the_threshold() -> None:
    rows = rows_for("fedavg", [0.20, 0.45, 0.60, 0.68])
    assert epochs_to_reach(rows, 0.45) == 4.0  # reaching it exactly counts
    assert epochs_to_reach(rows, 0.50) == 6.0
    assert epochs_to_reach(rows, 0.69) is None


def test_epochs_to_reach_skips_rows_without_accuracy() -> None:
    rows = rows_for("central", [0.3, 0.5])
    rows[0]["test_top1"] = None  # a NaN written as null
    assert epochs_to_reach(rows, 0.1) == 2.0


def test_group_by_arm_follows_the_arms_order() -> None:
    runs = list(reversed(all_runs()))
    groups = group_by_arm(runs)
    assert list(groups) == ["central", "central_mergenet", "fedavg", "fedavg_mergenet"]
    assert [r.seed for r in groups["central"]] == [0, 1]


def test_arm_table_means_and_std_over_seeds() -> None:
    table = arm_table(all_runs())
    central = table.arm("central")
    assert central.seeds == [0, 1]
    assert central.best_top1 == pytest.approx((0.70 + 0.66) / 2)
    assert central.final_top1 == pytest.approx((0.70 + 0.62) / 2)
    assert central.final_top1_std == pytest.approx(statistics.stdev([0.70, 0.62]))
    assert central.final_top5 == pytest.approx((0.90 + 0.82) / 2)
    fedavg = table.arm("fedavg")
    assert fedavg.final_top1 == pytest.approx(0.68)
    assert fedavg.final_top1_std is None  # one seed: no spread to report
    assert fedavg.bytes_total == 6000 and fedavg.bytes_per_round == 1500
    assert table.arm("fedavg_mergenet").fusion_rounds == 2
    assert table.arm("fedavg_mergenet").teacher == "checkpoint"
    assert fedavg.teacher == "n/a"


def test_thresholds_come_from_the_best_arm_mean_final() -> None:
    table = arm_table(all_runs())
    assert table.best_final == pytest.approx(0.79)  # central_mergenet, (.80 + .78) / 2
    assert table.thresholds == pytest.approx([0.395, 0.5925, 0.711, 0.7505])


def test_epochs_to_threshold_are_means_over_seeds_or_not_reached() -> None:
    table = arm_table(all_runs())
    # central: seed 0 reaches .395 at epoch 2, seed 1 at epoch 1; seed 0 never reaches .711.
    assert table.arm("central").epochs_to == pytest.approx([1.5, 3.0, None, None])
    # central_mergenet: both seeds reach .395 at epoch 1 and .5925 at epoch 2; .7505 at
    # epoch 4 for seed 0 (.75 at epoch 3 is just short) and epoch 3 for seed 1.
    assert table.arm("central_mergenet").epochs_to == pytest.approx([1.0, 2.0, 3.0, 3.5])
    # Federated rows are 2 epoch-equivalents apart.
    assert table.arm("fedavg_mergenet").epochs_to == pytest.approx([4.0, 6.0, 8.0, None])


def test_a_value_some_seed_lacks_is_unknown_not_averaged_over_the_others() -> None:
    runs = [make_run("central", 0, [0.5, 0.6]), make_run("central", 1, [0.5, 0.7])]
    del runs[1].summary["final_top5"]
    del runs[1].summary["wall_time_s"]
    stats = arm_table(runs).arm("central")
    assert stats.final_top5 is None  # shown as n/a
    assert stats.best_top5 == pytest.approx((0.8 + 0.9) / 2)
    assert stats.wall_time_s is None  # every summary the project writes has it; this one does not


def test_differing_settings_ignore_output_names_and_spelling() -> None:
    settings = differing_settings(all_runs())
    assert settings["seed"] == [0, 1]
    assert settings["local_epochs"] == [None, 2]  # unset for the central runs
    assert "dataset" not in settings  # same everywhere
    assert "out" not in settings and "run_name" not in settings


def test_conclusion_names_the_winner_when_the_gap_beats_the_spread() -> None:
    text = conclusion(arm_table(all_runs()))
    headline = text.splitlines()[0]
    # central_mergenet 79% vs fedavg_mergenet 74% (one seed) -> cannot call it clear.
    assert headline.startswith("Best arm by mean final top-1: central_mergenet (79.0%)")
    assert "5.0 pp above the runner-up fedavg_mergenet" in headline
    assert "no clear difference" in headline
    # Against central (2 seeds each, gap 13 pp, std 5.7 pp, ranges apart) it is clear.
    assert "central_mergenet vs central (66.0%): 13.0 pp above, a clear difference" in text


def test_conclusion_answers_fed_vs_central_mergenet_with_seeds() -> None:
    runs = [make_run("central_mergenet", 0, [0.5, 0.60]), make_run("central_mergenet", 1, [0.5, 0.62]),
            make_run("fedavg_mergenet", 0, [0.5, 0.70]), make_run("fedavg_mergenet", 1, [0.5, 0.72])]
    text = conclusion(arm_table(runs))
    assert "fedavg_mergenet (71.0%), 10.0 pp above the runner-up central_mergenet" in text
    assert "a clear difference" in text
    assert "Does fedavg_mergenet match or beat central_mergenet? yes, it beats it by 10.0 pp" in text


def test_conclusion_says_no_clear_difference_when_seeds_overlap() -> None:
    runs = [make_run("central_mergenet", 0, [0.5, 0.60]), make_run("central_mergenet", 1, [0.5, 0.70]),
            make_run("fedavg_mergenet", 0, [0.5, 0.62]), make_run("fedavg_mergenet", 1, [0.5, 0.70])]
    text = conclusion(arm_table(runs))
    assert "no clear difference" in text.splitlines()[0]
    assert "no clear difference either way: +1.0 pp" in text


def test_arms_run_on_the_same_seeds_are_compared_pair_by_pair() -> None:
    """Seen on a GPU: every seed of central_placebo (90.57, 90.88 %) beats every seed of
    central_mergenet (89.92, 90.40 %), but two paired gaps of +0.65 and +0.48 pp put the mean's
    95 % interval at -0.5 to +1.6 pp: not a clear difference, as the placebo line says too."""
    runs = placebo_runs([0.8992, 0.9040], [0.9057, 0.9088])
    unpaired = conclusion(arm_table(runs)).splitlines()[0]
    assert unpaired.endswith("a clear difference.")
    paired = conclusion(arm_table(runs), runs).splitlines()[0]
    assert paired.endswith("no clear difference (paired over seeds, 95% interval -0.5 to +1.6 pp, which includes zero).")


def test_arms_of_other_strategies_are_compared_with_fedavg_paired_by_seed() -> None:
    """Runs that differ only in the strategy: fedadam_mergenet against fedavg_mergenet, seed by
    seed, and its placebo control found by name; they follow the suite's arms in the tables."""
    runs = [make_run("fedavg_mergenet", 0, [0.5, 0.60]), make_run("fedavg_mergenet", 1, [0.5, 0.64]),
            make_run("fedadam_mergenet", 0, [0.5, 0.70]), make_run("fedadam_mergenet", 1, [0.5, 0.75]),
            make_run("fedadam_placebo", 0, [0.5, 0.70]), make_run("fedadam_placebo", 1, [0.5, 0.76])]
    text = conclusion(arm_table(runs), runs)
    assert ("fedadam_mergenet vs fedavg_mergenet (only the strategy differs): +10.5 pp, paired over seeds 0, 1, "
            "spread 0.7 pp, 95% interval +4.1 to +16.9 pp: a clear difference.") in text
    assert "Does the trained teacher help fedadam_mergenet beyond its placebo fedadam_placebo? not shown" in text
    assert list(group_by_arm(runs)) == ["fedavg_mergenet", "fedadam_mergenet", "fedadam_placebo"]


@pytest.mark.parametrize(("name", "known"), [
    ("central", True), ("central_placebo", True), ("fedavg", True), ("krum_mergenet", True),
    ("fedavg-dp-server-fixed_placebo", True), ("fedavg-dp-none", False), ("fedsgd", False),
    ("fedavg_distilled", False)])
def test_arm_names_are_checked_when_results_are_read(name: str, known: bool) -> None:
    assert known_arm(name) is known


def test_conclusion_says_no_clear_difference_for_single_seeds() -> None:
    runs = [make_run("central_mergenet", 0, [0.5, 0.60]), make_run("fedavg_mergenet", 0, [0.5, 0.90])]
    text = conclusion(arm_table(runs))
    assert "fedavg_mergenet (90.0%), 30.0 pp above" in text  # the gap is still stated
    assert "no clear difference (one seed per arm" in text
    assert "cannot tell" in text


def placebo_runs(trained: list[float], placebo: list[float], arm: str = "central") -> list[RunResult]:
    """Final top-1 per seed of a trained-teacher arm and its placebo (seeds 0, 1, ...)."""
    return ([make_run(f"{arm}_mergenet", seed, [0.3, acc]) for seed, acc in enumerate(trained)]
            + [make_run(f"{arm}_placebo", seed, [0.3, acc]) for seed, acc in enumerate(placebo)])


def test_the_teacher_is_credited_when_the_interval_of_its_gain_lies_above_zero() -> None:
    """Paired by seed: gaps +4, +5, +6 pp, mean 5, std 1; over three seeds the mean's 95 %
    interval is 5 +- 4.303 / sqrt(3) = +2.5 to +7.5 pp."""
    text = conclusion(arm_table(runs := placebo_runs([0.74, 0.70, 0.86], [0.70, 0.65, 0.80])), runs)
    line = next(line for line in text.splitlines() if "beyond its placebo" in line)
    assert line.startswith("Does the trained teacher help central_mergenet beyond its placebo central_placebo? yes")
    assert "+5.0 pp" in line and "spread (std of the gaps) 1.0 pp" in line
    assert "95% interval +2.5 to +7.5 pp" in line and "credited to the teacher's knowledge" in line


def test_a_gain_above_its_spread_on_two_seeds_is_not_yet_credited() -> None:
    """Gaps +0.4 and +0.8 pp (seen on a GPU): the mean, +0.6 pp, is twice the gaps' std, but two
    seeds put the mean's 95 % interval at 0.6 +- 12.706 * 0.28 / sqrt(2) = -1.9 to +3.1 pp."""
    runs = placebo_runs([0.854, 0.878], [0.850, 0.870], arm="fedavg")
    line = next(line for line in conclusion(arm_table(runs), runs).splitlines() if "beyond its placebo" in line)
    assert "not shown: +0.6 pp" in line and "95% interval -1.9 to +3.1 pp" in line
    assert "the interval includes zero, so no gain can be credited to the teacher" in line


@pytest.mark.parametrize(("df", "quantile"), [(1, 12.706), (2, 4.303), (30, 2.042), (60, 2.0), (1000, 1.962)])
def test_the_interval_uses_students_t(df: int, quantile: float) -> None:
    assert t_975(df) == pytest.approx(quantile, abs=2e-3)


def test_the_teacher_is_not_credited_when_the_gap_is_within_the_spread() -> None:
    """Gaps +10, -6, +2 pp: mean +2 pp but a spread of 8 pp. Pairing matters: unpaired, the arms'
    means (66.0% vs 64.0%) would look like a 2 pp gain."""
    runs = placebo_runs([0.80, 0.54, 0.64], [0.70, 0.60, 0.62], arm="fedavg")
    text = conclusion(arm_table(runs), runs)
    line = next(line for line in text.splitlines() if "beyond its placebo" in line)
    assert "fedavg_mergenet beyond its placebo fedavg_placebo? not shown: +2.0 pp" in line
    assert "no gain can be credited to the teacher" in line


def test_one_paired_seed_credits_nothing() -> None:
    runs = placebo_runs([0.90], [0.50])
    text = conclusion(arm_table(runs), runs)
    assert "cannot tell: +40.0 pp on one paired seed" in text


def test_a_teacher_that_does_worse_than_its_placebo_is_called_so() -> None:
    runs = placebo_runs([0.60, 0.61, 0.62], [0.70, 0.72, 0.71])
    assert "no, it hurts: -10.0 pp" in conclusion(arm_table(runs), runs)


# ----------------------------------------------------------------- folders and the report


def test_discover_runs_skips_crashed_and_corrupt_folders(results_dir: Path) -> None:
    runs, skipped = discover_runs([results_dir])
    assert len(runs) == 6
    reasons = {p.name: why for p, why in skipped}
    assert "summary.json is missing" in reasons["crashed"]
    assert "is not JSON" in reasons["corrupt"]


def test_discover_runs_accepts_a_run_folder_and_skips_partial_status(tmp_path: Path) -> None:
    done = write_run(tmp_path / "done", "fedavg", 0, [0.1, 0.2])
    partial = write_run(tmp_path / "partial", "fedavg", 1, [0.1])
    write_summary(partial, {**summary_for("fedavg", 1, [0.1]), "status": "partial"})
    runs, skipped = discover_runs([done, partial, tmp_path / "missing"])
    assert [r.path for r in runs] == [done]
    assert [p.name for p, _ in skipped] == ["partial", "missing"]
    assert "'partial'" in skipped[0][1]


def test_report_builds_despite_skipped_folders(report) -> None:
    text = report.path.read_text(encoding="utf-8")
    assert report.path.name == "report.md"
    assert "| central | 0, 1 | 68.00 ± 2.83 | 66.00 ± 5.66 |" in text
    assert "| fedavg | 0 | 68.00 | 68.00 |" in text
    assert "not reached" in text
    assert "79.00%" in text  # the thresholds' base is stated
    assert "crashed" in text and "summary.json is missing" in text
    assert "corrupt" in text and "is not JSON" in text
    assert "`local_epochs`" in text and "`seed`" in text
    assert report.conclusion.splitlines()[0] in text
    for name in FIGURES:
        assert f"]({name})" in text  # relative links, so the folder can be moved


def test_report_writes_json_and_csv(report) -> None:
    data = json.loads((report.path.parent / "comparison.json").read_text(encoding="utf-8"))
    assert [a["arm"] for a in data["arms"]] == ["central", "central_mergenet", "fedavg", "fedavg_mergenet"]
    assert data["best_final"] == pytest.approx(0.79)
    assert data["arms"][0]["epochs_to"] == pytest.approx([1.5, 3.0, None, None])
    assert len(data["skipped"]) == 2
    csv_lines = (report.path.parent / "comparison.csv").read_text(encoding="utf-8").splitlines()
    assert csv_lines[0].startswith("arm,n_seeds,seeds,best_top1")
    assert len(csv_lines) == 5


def test_the_report_names_the_teacher_the_arms_fused_from(report) -> None:
    text = report.path.read_text(encoding="utf-8")
    assert ("- `checkpoints/resnet50.pt`: pretrained for 200 epoch(s), test top-1 77.00 %: central_mergenet, "
            "fedavg_mergenet") in text
    assert "not about one teacher" not in text
    data = json.loads((report.path.parent / "comparison.json").read_text(encoding="utf-8"))
    assert data["teachers"] == [{"source": "checkpoint", "path": "checkpoints/resnet50.pt", "epochs": 200,
                                 "test_top1": 0.77, "arms": ["central_mergenet", "fedavg_mergenet"]}]


def test_arms_that_fused_from_different_teachers_are_told_apart() -> None:
    runs = all_runs()
    weaker = next(r for r in runs if (r.arm, r.seed) == ("central_mergenet", 0))
    weaker.summary["teacher"] = {**weaker.summary["teacher"], "epochs": 1, "test_top1": 0.65}
    teachers = teachers_used(runs)
    assert [(t["epochs"], t["arms"]) for t in teachers] == [(1, ["central_mergenet"]),
                                                           (200, ["central_mergenet", "fedavg_mergenet"])]
    assert "a gap between them is not about one teacher" in teacher_markdown(teachers)
    assert teacher_markdown(teachers_used([r for r in runs if not r.arm.endswith("mergenet")])) == "No arm fused."


@pytest.mark.parametrize("name", FIGURES)
def test_each_figure_is_an_800x500_png(report, name: str) -> None:
    from PIL import Image

    with Image.open(report.path.parent / name) as image:
        assert image.format == "PNG"
        assert image.size == (800, 500)


def test_write_report_returns_the_report_path(tmp_path: Path) -> None:
    run = write_run(tmp_path / "runs" / "central_s0", "central", 0, [0.3, 0.5])
    path = write_report([run], tmp_path / "out").path
    assert path == tmp_path / "out" / "report.md"
    assert "it is the only arm" in path.read_text(encoding="utf-8")


def test_write_report_without_runs_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no results found under"):
        write_report([tmp_path], tmp_path / "out")


def test_cli_on_an_empty_folder_exits_2_with_one_line(tmp_path: Path) -> None:
    python = REPO / ".venv" / "bin" / "python"
    done = subprocess.run([str(python if python.exists() else sys.executable), "compare_results.py",
                           str(tmp_path), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("error: no results found under")
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_cli_prints_the_report_path_and_conclusion(results_dir: Path, tmp_path: Path) -> None:
    python = REPO / ".venv" / "bin" / "python"
    done = subprocess.run([str(python if python.exists() else sys.executable), "compare_results.py",
                           str(results_dir), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(tmp_path / "out" / "report.md")
    assert lines[1].startswith("Best arm by mean final top-1: central_mergenet")


def test_round_times_split_a_federated_runs_rounds_into_training_and_the_rest():
    """A round spans from its train messages to the next round's. Here the first two rounds
    span 9.5 s around 3.3 s of their slowest client's training (6 s of it recalibration), a
    resume restarts the clock before round 3, and round 4's span is unknown: two rounds count."""
    from fedmergenet.results import round_times

    def row(n: int, start: float | None, train: float | None, recalibrate: float = 0.0,
            total: float | None = None, exchange: float | None = None) -> dict:
        parts = {"train_dispatch_s": 0.05, "train_last_client_s": total + 0.02, "train_last_function_s": total,
                 "train_return_s": 0.08, "train_unpack_s": 0.01} if exchange is not None else {}
        return {"round": n, "round_start_s": start, "slowest_client_train_s": train,
                "slowest_client_recalibrate_s": recalibrate, "slowest_client_total_s": total,
                "train_exchange_s": exchange, "state_wait_ms": None if exchange is None else 40.0, **parts}

    rows = [row(0, None, None), row(1, 10.0, 3.3, 6.0, 9.8, 9.9), row(2, 19.5, 3.3, 6.0, 9.9, 10.1),
            row(3, 29.0, 3.3, 6.0), row(4, 2.0, 3.3, 6.0)]
    times = round_times(rows)
    assert times["rounds"] == 2
    assert times["span_s"] == pytest.approx(9.5)
    assert times["slowest_train_s"] == pytest.approx(3.3)
    assert times["slowest_recalibrate_s"] == pytest.approx(6.0)
    assert times["span_over_training"] == pytest.approx(9.5 / 3.3)
    assert times["slowest_client_total_s"] == pytest.approx(9.85)  # the client's whole train function
    assert times["train_exchange_s"] == pytest.approx(10.0)  # that function and Flower's messages
    assert times["state_wait_s"] == pytest.approx(0.04)  # the server waiting for the disk
    # The exchange along its last reply: out, that client's side (its function within), back, unpacking.
    assert [times[key] for key in ("train_dispatch_s", "train_last_client_s", "train_last_function_s",
                                   "train_return_s", "train_unpack_s")] == pytest.approx([0.05, 9.87, 9.85, 0.08, 0.01])
    older = round_times([{key: value for key, value in r.items() if not key.startswith(("train_", "slowest_client_total",
                                                                                        "state_wait"))} for r in rows])
    assert older["slowest_client_total_s"] is None and older["train_exchange_s"] is None
    assert older["train_dispatch_s"] is None and older["train_unpack_s"] is None
    assert older["state_wait_s"] is None
    assert round_times(rows[:2]) is None  # no round's span is known yet
