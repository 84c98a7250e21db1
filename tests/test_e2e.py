"""End-to-end runs of the real Flower runtimes on tiny real data (Fashion-MNIST, offline).

Slow (about a minute each) but run in CI: they are the proof that the pieces work together.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmergenet.config import RunConfig
from fedmergenet.experiments.baseline import run_central, union_of_client_data
from fedmergenet.experiments.estimate import Estimate, estimate_suite
from fedmergenet.launcher.processes import RuntimeFailure
from fedmergenet.launcher.suite import run_suite, run_units, suite_units
from fedmergenet.data.splits import client_data
from fedmergenet.models import STUDENT_LAYER, state_checksum
from fedmergenet.results import ARMS, read_metrics, read_summary

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist package")


def tiny(teacher: Path, out: Path, **changes) -> RunConfig:
    """A run small enough for CI. One adapter layer instead of the paper's two halves each fusion
    step and the per-round checkpoint; the two-layer adapter is exercised in test_fusion.py."""
    cfg = RunConfig(dataset="fashion-mnist", device="cpu", train_limit=96, test_limit=64, rounds=3, local_epochs=1, num_clients=2, batch_size=16,
                    fusion_batches=2, adapter_layers=1, teacher_checkpoint=str(teacher), output_dir=str(out),
                    data_dir=str(out / "data"))
    return cfg.replace(**changes)


MARK = "FEDMERGENET_TEST_RUN"


def flower_processes(mark: str) -> set[int]:
    """PIDs of Flower and Ray processes on this machine started with ``MARK=mark`` in their
    environment: what one test started (children inherit it), while other tests run beside it."""
    out = subprocess.run(["pgrep", "-f", "flower-superlink|flower-supernode|flwr-serverapp|flwr-clientapp|raylet|gcs_server"],
                         capture_output=True, text=True).stdout
    marked = set()
    for pid in map(int, out.split()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone already, or not ours to read
        if f"{MARK}={mark}".encode() in environ:
            marked.add(pid)
    return marked


def test_baseline_trains_on_exactly_the_clients_training_data(tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "t.pt", tmp_path, num_clients=3)
    client_indices = [client_data(cfg, i, 3).train.dataset.indices for i in range(3)]
    union = np.sort(np.concatenate([np.asarray(idx) for idx in client_indices]))
    assert np.array_equal(union, union_of_client_data(cfg))


def test_the_suite_estimate_scales_with_seeds_and_names_the_teacher_when_it_must_be_trained() -> None:
    """The estimate the suite prints before it starts: a few timed steps on this machine, scaled."""
    cfg = RunConfig(dataset="fashion-mnist", device="cpu", batch_size=4, rounds=2, local_epochs=1, teacher_epochs=1)
    with_teacher = estimate_suite(cfg, seeds=2, train_images=96, test_images=64, num_classes=10, teacher_images=40)
    assert with_teacher.per_seed_s > 0 and with_teacher.arms_s == pytest.approx(2 * with_teacher.per_seed_s)
    assert with_teacher.teacher_s > 0
    assert "teacher pretraining" in with_teacher.describe() and "2 seed(s)" in with_teacher.describe()
    assert "teacher" not in Estimate(teacher_s=0.0, per_seed_s=60.0, seeds=3).describe()
    # A GPU pretrains the teacher in seconds: said so, not as "~0 min".
    assert Estimate(teacher_s=23.0, per_seed_s=60.0, seeds=3).describe().startswith(
        "estimated time: teacher pretraining ~23 s, then ~3 min for 6 arms x 3 seed(s)")


def test_the_estimate_times_a_fusion_as_the_runs_hundreds_of_them_cost_not_its_first(monkeypatch) -> None:
    """A run fuses hundreds of times in one process: the estimate leaves the first call's set-up
    out (stood in for by a unit whose first fusion is slow) and takes the median of the rest."""
    from fedmergenet.experiments import estimate

    calls: list[str] = []

    class FirstIsSlow:
        device = torch.device("cpu")

        def __init__(self, *args, **kwargs) -> None:
            pass

        def fuse(self, layer: torch.Tensor) -> torch.Tensor:
            calls.append("fuse")
            time.sleep(1.0 if len(calls) == 1 else 0.01)
            return layer

        def learn(self, fused: torch.Tensor, observed: torch.Tensor) -> float:
            calls.append("learn")
            return 0.0

    monkeypatch.setattr(estimate, "KnowledgeFusionUnit", FirstIsSlow)
    seconds = estimate.fusion_seconds(10, RunConfig(dataset="fashion-mnist", device="cpu"))
    assert calls == ["fuse", "learn"] * (1 + estimate.FUSION_SAMPLES)
    assert 0.01 <= seconds < 0.5


def test_each_unit_of_the_suite_is_the_runners_own_command_for_its_arm(tmp_path: Path) -> None:
    """The suite runs its arms as runner processes: each command line parses back to exactly
    the arm's options, so an arm run by the suite is the arm a user runs by hand."""
    from fedmergenet.cli import runner_parser
    from fedmergenet.config import config_from_args

    cfg = tiny(tmp_path / "t.pt", tmp_path, lr_milestones="1,2", alpha=0.5, random_teacher=True)
    units = suite_units(cfg, seeds=[3, 4], root=tmp_path / "suite", cotrain_teacher=True)
    assert [u.name for u in units[:5]] == ["seed3/federated", "seed4/federated",  # the longest first
                                           "seed3/central", "seed3/central_mergenet", "seed3/central_placebo"]
    assert len(units) == 8
    for unit in units:
        args = runner_parser().parse_args(unit.command()[2:])
        assert config_from_args(args) == unit.cfg, unit.name
        central = unit.kind == "central"
        assert (args.central, args.cotrain_teacher, args.pretrain_teacher) == (central, central, False)
    federated = units[0].cfg
    assert (federated.seed, federated.fusion_arms) == (3, "plain mergenet placebo")
    assert [run.output_dir for run in federated.arm_runs()] == [
        str(tmp_path / "suite" / "seed3" / arm) for arm in ("fedavg", "fedavg_mergenet", "fedavg_placebo")]
    assert units[6].cfg.output_dir == str(tmp_path / "suite" / "seed4" / "central_mergenet")


def test_a_missing_teacher_is_pretrained_first_and_side_by_side_beside_the_arms(tmp_path: Path,
                                                                                teacher_file: Path) -> None:
    """Side by side, the suite pretrains a missing teacher beside the first arms, in no place of
    theirs, and the arms wait for its checkpoint instead of each pretraining one; one at a time
    it runs first, alone. A teacher already there is not pretrained again."""
    from fedmergenet.cli import runner_parser
    from fedmergenet.config import config_from_args

    cfg = tiny(tmp_path / "t.pt", tmp_path)
    teacher, *arms = suite_units(cfg, seeds=[0], root=tmp_path / "suite", jobs=3)
    assert (teacher.name, teacher.kind, teacher.beside) == ("teacher", "teacher", True)
    args = runner_parser().parse_args(teacher.command()[2:])
    assert args.pretrain_teacher and config_from_args(args) == cfg
    assert [arm.kind for arm in arms] == ["federated", "central", "central", "central"]
    assert all(arm.cfg.await_teacher and not arm.beside for arm in arms)
    assert all(config_from_args(runner_parser().parse_args(arm.command()[2:])) == arm.cfg for arm in arms)

    teacher, *arms = suite_units(cfg, seeds=[0], root=tmp_path / "suite", jobs=1)
    assert teacher.kind == "teacher" and not teacher.beside and not any(arm.cfg.await_teacher for arm in arms)
    ready = tiny(teacher_file, tmp_path)
    assert [unit.kind for unit in suite_units(ready, seeds=[0], root=tmp_path / "suite", jobs=3)] == [
        "federated", "central", "central", "central"]


@dataclass(frozen=True)
class Sleeper:
    """A stand-in for a suite unit: a process that sleeps."""

    name: str
    seconds: float
    beside: bool = False

    def command(self) -> list[str]:
        return [sys.executable, "-c", f"import time; time.sleep({self.seconds})"]

    def log_path(self, root: Path) -> Path:
        return root / f"{self.name}.log"


def test_a_unit_beside_the_others_takes_none_of_their_places(tmp_path: Path) -> None:
    done = run_units([Sleeper("teacher", 3.0, beside=True), Sleeper("a", 1.5), Sleeper("b", 0.1)], tmp_path,
                     jobs=1, echo=False)
    assert done["a"]["start_s"] < done["teacher"]["seconds"]  # started beside the teacher
    assert done["b"]["start_s"] >= done["a"]["start_s"] + done["a"]["seconds"] - 0.5  # one place: after a


@needs_fashion
def test_an_arm_that_fails_stops_the_suite_with_its_own_error_line(tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "t.pt", tmp_path, train_limit=4, num_clients=5, random_teacher=True)
    units = [unit for unit in suite_units(cfg, seeds=[0], root=tmp_path / "suite") if unit.kind == "central"][:2]
    with pytest.raises(RuntimeFailure) as failure:
        run_units(units, tmp_path / "suite", jobs=2, echo=False)
    message = str(failure.value)
    assert message.startswith("seed0/central") and "exit code 2" in message
    assert "--num-clients 5 exceeds the 4 training images" in message and ".log" in message


@pytest.mark.slow
@needs_fashion
def test_the_suite_runs_six_arms_on_the_same_budget_and_reports(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)  # every process of the run inherits it
    teacher_file = tmp_path / "teacher.pt"  # missing: the suite pretrains it
    cfg = tiny(teacher_file, tmp_path, rounds=2, fusion_start_round=1, teacher_epochs=1)
    report = run_suite(cfg, seeds=[0], root=tmp_path / "suite", echo=False, jobs=2)

    runs = {arm: tmp_path / "suite" / "seed0" / arm for arm in ARMS}
    summaries = {arm: read_summary(path) for arm, path in runs.items()}
    assert all(s["status"] == "completed" for s in summaries.values())
    assert {s["epoch_equiv"] for s in summaries.values()} == {2}  # same budget of passes over the data
    assert all(s["fusion_skipped"] == 0 for s in summaries.values())

    rows = read_metrics(runs["fedavg_mergenet"])
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["fusion_applied"] for r in rows] == [0, 1, 1]  # fusion from round 1
    assert rows[2]["adapter_learned"] == 1 and rows[2]["adapter_loss"] is not None  # it learns in round 2
    assert rows[2]["gate"] != 0.0  # and the gate moved
    assert all(r["round_status"] in ("initial", "ok") for r in rows)
    assert [r["bn_recalibrated"] for r in rows[1:]] == [2, 2]  # both clients recomputed BatchNorm statistics
    assert rows[1]["bytes_up"] > 0 and rows[1]["bytes_down"] > 0
    assert [r["fusion_applied"] for r in read_metrics(runs["fedavg"])] == [0, 0, 0]
    assert sum(r["fusion_applied"] for r in read_metrics(runs["central_mergenet"])) > 0
    assert [r["fusion_applied"] for r in read_metrics(runs["fedavg_placebo"])] == [0, 1, 1]
    # The three federated arms ran one after another in one Flower run.
    flower_log = (tmp_path / "suite" / "seed0" / "flower.log").read_text()
    assert [line.split("Results: ")[1].strip() for line in flower_log.splitlines() if "Results: " in line] == [
        str(runs[arm]) for arm in ("fedavg", "fedavg_mergenet", "fedavg_placebo")]

    # One teacher for every arm, pretrained beside them: each fusing arm recorded the checksum of
    # the checkpoint there now. The placebo arms fused from it with its fc.weight shuffled.
    weights = torch.load(teacher_file, weights_only=True)["state_dict"]
    assert summaries["fedavg_mergenet"]["teacher"]["sha256"] == state_checksum(weights)
    assert summaries["central_mergenet"]["teacher"]["sha256"] == state_checksum(weights)
    for arm in ("central_placebo", "fedavg_placebo"):
        assert summaries[arm]["teacher"]["source"] == "placebo"
        assert summaries[arm]["teacher"]["sha256"] != state_checksum(weights)

    # Two at a time, the teacher beside them: the central arms ran while the federated run did,
    # which started before the teacher was saved; each unit wrote its own log.
    timing = json.loads((tmp_path / "suite" / "timing.json").read_text())
    units = timing["units"]
    assert timing["jobs"] == 2 and set(units) == {"teacher"} | {f"seed0/{arm}" for arm in
                                                                ("federated", "central", "central_mergenet",
                                                                 "central_placebo")}
    assert timing["before_units_s"] <= min(unit["start_s"] for unit in units.values())  # one clock, the command's
    assert units["seed0/federated"]["start_s"] < units["teacher"]["start_s"] + units["teacher"]["seconds"]
    assert units["seed0/central"]["start_s"] < units["seed0/federated"]["seconds"]
    assert "teacher saved to" in (tmp_path / "suite" / "teacher.log").read_text()
    assert "Results: " in (tmp_path / "suite" / "seed0" / "federated.log").read_text()

    assert report.name == "report.md" and report.is_file()
    assert (report.parent / "gate_vs_epochs.png").is_file()
    assert "beyond its placebo" in report.read_text()
    time.sleep(1)
    assert flower_processes(mark) == set(), "Flower or Ray processes were left behind"


@pytest.mark.slow
@needs_fashion
def test_central_mergenet_fusing_every_batch_keeps_the_layer_in_scale(tmp_path: Path) -> None:
    """The divergence the norm-preserving fusion prevents: MergeNet's f=1 (fuse before every batch) for
    3 epochs with a random teacher skips no fusion and ends with the fused layer's std within 2x of
    the same run without fusion."""
    cfg = tiny(tmp_path / "none.pt", tmp_path, train_limit=112, batch_size=16, fusion_batches=1, random_teacher=True)
    fused = run_central(cfg.replace(output_dir=str(tmp_path / "fused")), mergenet=True, echo=False)
    plain = run_central(cfg.replace(output_dir=str(tmp_path / "plain")), mergenet=False, echo=False)
    rows = read_metrics(fused)
    batches = -(-len(union_of_client_data(cfg)) // cfg.batch_size)
    assert batches >= 6
    assert sum(r["fusion_applied"] for r in rows) == 3 * batches and sum(r["fusion_skipped"] for r in rows) == 0
    std = {name: float(torch.load(run / "final_model.pt", weights_only=True)[STUDENT_LAYER].std())
           for name, run in (("fused", fused), ("plain", plain))}
    assert 0.5 * std["plain"] < std["fused"] < 2 * std["plain"], std


def _python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / script), *args]


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@needs_fashion
def test_server_refuses_a_missing_teacher_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(_python("federated_mergenet_server.py", "--insecure", "--teacher-checkpoint",
                                    str(tmp_path / "nope.pt"), "--output-dir", str(tmp_path / "o")),
                            cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    line = _one_line_error(result)
    assert "nope.pt" in line and "--pretrain-teacher" in line


@pytest.mark.parametrize("args, expected", [
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--alpha", "-1"], "--alpha"),
    (["--rounds", "0"], "--rounds"),
    (["--num-clients", "2", "--clients-per-round", "3"], "--clients-per-round"),
    (["--device", "tpu"], "unknown device"),
])
def test_runner_rejects_bad_options_with_one_line(args: list[str], expected: str) -> None:
    result = subprocess.run(_python("run_federated_mergenet.py", *args), cwd=ROOT, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert expected in _one_line_error(result)


def test_the_central_arms_and_teacher_pretraining_run_without_flower() -> None:
    """What the central arms and the teacher need lives in data/, models/, training, results."""
    code = ("import sys\n"
            "from fedmergenet.experiments import baseline, pretrain\n"
            "from fedmergenet.results import library_versions\n"
            "assert library_versions()['flwr'] != 'unknown'\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_server_needs_tls_or_an_explicit_insecure() -> None:
    result = subprocess.run(_python("federated_mergenet_server.py"), cwd=ROOT, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert "--insecure" in _one_line_error(result)


def test_client_id_must_be_one_of_the_partitions() -> None:
    result = subprocess.run(_python("federated_mergenet_client.py", "--client_id", "3", "--num_clients", "3", "--insecure"),
                            cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert "--client_id" in _one_line_error(result)


@pytest.mark.slow  # two server processes, each importing torch and Flower
@needs_fashion
def test_server_refuses_a_port_in_use_and_an_unwritable_output(tmp_path: Path, teacher_file: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(_python("federated_mergenet_server.py", "--insecure", "--port", str(port),
                                        "--teacher-checkpoint", str(teacher_file), "--output-dir", str(tmp_path / "o")),
                                cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert "already in use" in _one_line_error(result)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = subprocess.run(_python("federated_mergenet_server.py", "--insecure", "--teacher-checkpoint", str(teacher_file),
                                    "--output-dir", str(blocker / "out")),
                            cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert "not writable" in _one_line_error(result)


@pytest.mark.parametrize("args", [
    ["--central", "--no-fusion", "--output-dir"],
    ["--central", "--random-teacher", "--output-dir"],
    ["--no-fusion", "--output-dir"],
    ["--mode", "deployment", "--no-fusion", "--output-dir"],
    ["--suite", "--random-teacher", "--results-root"],
    ["--pretrain-teacher", "--teacher-checkpoint"],
])
def test_every_door_of_the_runner_refuses_an_unwritable_output_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """The same check on every door, before any training (checks.check_run)."""
    from fedmergenet.cli import runner_main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert runner_main([*args, str(blocker / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not writable" in errors[0], errors


def test_the_suite_refuses_a_teacher_it_could_not_save_before_any_arm_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its arms would start beside the teacher's pretraining: the folder is checked first."""
    from fedmergenet.cli import runner_main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert runner_main(["--suite", "--jobs", "2", "--teacher-checkpoint", str(blocker / "teacher.pt"),
                        "--results-root", str(tmp_path / "s")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: teacher checkpoint folder {blocker} is not writable (File exists)"], errors
    assert not list((tmp_path / "s").iterdir())


def test_the_suite_refuses_fewer_than_one_job_before_any_work(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from fedmergenet.cli import runner_main

    assert runner_main(["--suite", "--jobs", "0", "--random-teacher", "--results-root", str(tmp_path / "s")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: --jobs must be at least 1 (got 0)"]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("seeds", "error"), [
    (["0", "0"], "error: --seeds must differ from one another (got 0 0)"),
    (["1", "-3"], "error: --seed must be in [0, 2**32) (got -3)"),
])
def test_the_suite_refuses_bad_seeds_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     seeds: list[str], error: str) -> None:
    from fedmergenet.cli import runner_main

    assert runner_main(["--suite", "--seeds", *seeds, "--random-teacher", "--results-root", str(tmp_path / "s")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [error]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("made", "error"), [
    (None, "no such folder"),
    ("metrics.jsonl", "summary.json is missing; a run stopped before it recorded round 0 has nothing to resume"),
    ("summary.json", "summary.json is not JSON"),
])
def test_resume_refuses_a_folder_without_a_run_to_resume_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], made: str | None, error: str) -> None:
    """A run stopped during its start-up has written no summary, so no settings to resume with."""
    from fedmergenet.cli import runner_main

    run = tmp_path / "run"
    if made is not None:
        run.mkdir()
        (run / made).write_text("{")
    assert runner_main(["--resume", str(run)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and error in errors[0], errors
    assert [p.name for p in run.iterdir()] == [made] if made else not run.exists()  # nothing written or removed


def test_node_authentication_needs_tls_and_ecdsa_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedmergenet.cli import client_main, server_main

    certs, keys = tmp_path / "certs", tmp_path / "nodes"
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certificates.sh"), "127.0.0.1", str(certs)], check=True,
                   capture_output=True)
    subprocess.run(["bash", str(ROOT / "scripts" / "make_node_keys.sh"), "1", str(keys)], check=True, capture_output=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(tmp_path / "rsa")], check=True)
    (tmp_path / "empty").mkdir()
    tls = ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
           "--ssl-keyfile", str(certs / "server.key")]
    cases = [
        (server_main, ["--insecure", "--auth-supernode-keys", str(keys)], "needs TLS"),
        (server_main, [*tls, "--auth-supernode-keys", str(tmp_path / "missing.pub")], "missing.pub"),
        (server_main, [*tls, "--auth-supernode-keys", str(tmp_path / "empty")], "no *.pub node keys"),
        (server_main, [*tls, "--auth-supernode-keys", str(tmp_path / "rsa.pub")], "must be ECDSA"),
        (client_main, ["--client_id", "0", "--insecure", "--auth-supernode-private-key", str(keys / "client_0.pub")],
         "not an OpenSSH key"),
    ]
    for main, args, expected in cases:
        assert main(args) == 2, args
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], (args, errors)


def test_flwr_run_gets_a_slim_copy_of_the_app_with_the_same_bundle(tmp_path: Path) -> None:
    """`flwr run` walks every file of the app folder (a virtualenv inside took ~6 s per run):
    it is handed a copy holding only what a bundle can hold, and builds the same bundle."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from fedmergenet.launcher.flwr_cli import stage_app

    staged = stage_app(ROOT, tmp_path / "app")
    assert not (staged / ".venv").exists() and not (staged / ".git").exists()
    bundle = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(staged))).namelist())
    package = ROOT / "fedmergenet"
    app = [*(package / name for name in ("__init__.py", "atomic.py", "config.py", "errors.py", "results.py",
                                         "teacher.py", "training.py")),
           *(p for sub in ("data", "models", "fusion", "flower") for p in (package / sub).glob("*.py"))]
    assert bundle == {p.relative_to(ROOT).as_posix() for p in app} | {"pyproject.toml", ".info/CONTENT"}
    # The app only: no launcher, CLI, report or central arms inside the bundle.
    assert not any(name.startswith(("fedmergenet/launcher", "fedmergenet/report", "fedmergenet/experiments",
                                    "fedmergenet/cli.py")) for name in bundle)


@pytest.mark.slow
@needs_fashion
def test_plain_flwr_run_from_the_project_resolves_paths_in_the_project(tmp_path: Path) -> None:
    """The README's quickstart: in the environment the set-up made, Flower's own `flwr run .` from
    the project folder, with a preset file. The app runs from Flower's copy of the code, yet its
    relative paths (data, output, teacher) resolve in the project; a missing teacher fails the
    run with one line that names the command making it."""
    import os
    import signal

    from fedmergenet.flower.task import _editable_source
    from fedmergenet.launcher.federated import federation_config
    from fedmergenet.launcher.flwr_cli import FLOWER_SETTINGS, configure_project
    from fedmergenet.launcher.processes import free_port

    mark = uuid.uuid4().hex
    home = tmp_path / "flwr-home"
    configure_project(tmp_path / "no-venv", federation_config(RunConfig(), 1, gpus=0), flwr_home=home)
    http_port, control_port = free_port(), free_port()
    env = os.environ | FLOWER_SETTINGS | {
        "FLWR_HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        # A local SuperLink of its own, beside any the user has running.
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        MARK: mark}
    project = _editable_source("fedmergenet") or ROOT  # the project this environment was set up from
    out = Path("results") / f".pytest-flwr-run-{uuid.uuid4().hex[:8]}"
    tiny_run = tmp_path / "tiny.toml"
    tiny_run.write_text(f'train-limit = 96\ntest-limit = 64\nrounds = 1\nbatch-size = 16\nrandom-teacher = true\nadapter-layers = 1\n'
                        f'output-dir = "{out}"\n')
    no_teacher = tmp_path / "no_teacher.toml"
    no_teacher.write_text('rounds = 1\nteacher-checkpoint = "checkpoints/.pytest-missing.pt"\n')

    def flwr_run(preset: Path) -> str:
        result = subprocess.run(["flwr", "run", ".", "--run-config", str(preset), "--stream"], cwd=ROOT, env=env,
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
        return result.stdout + result.stderr

    try:
        log = flwr_run(tiny_run)
        summary = read_summary(project / out)
        assert summary["status"] == "completed", log
        assert (summary["arm"], summary["rounds"]) == ("fedavg_mergenet", 1)
        assert summary["config"]["dataset"] == "fashion-mnist"  # the app's default: the quick preset
        assert summary["config"]["data-dir"] == str(project / "data")

        log = flwr_run(no_teacher)
        errors = [line for line in log.splitlines() if "error: teacher checkpoint" in line]
        assert len(errors) == 1, log
        assert str(project / "checkpoints" / ".pytest-missing.pt") in errors[0] and "--pretrain-teacher" in errors[0]
        assert "Traceback" not in log
    finally:
        import shutil

        shutil.rmtree(project / out, ignore_errors=True)
        # `flwr run` leaves its local SuperLink running, detached in its own session: stop that session.
        found = subprocess.run(["pgrep", "-f", f"flower-superlink.*127.0.0.1:{control_port}"], capture_output=True,
                               text=True).stdout.split()
        for pid in map(int, found):
            os.killpg(pid, signal.SIGTERM)
    time.sleep(2)
    assert flower_processes(mark) == set(), "Flower or Ray processes were left behind"
