"""Faults tried for real on loopback: malformed updates from a ClientApp that misbehaves on
purpose, every server strategy with fusion on and off and a huge update that only the robust
ones keep out, a phase that times out, a server stopped mid-run and resumed, a secured deployment
with strangers knocking and a client killed mid-round, too few clients."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmergenet.config import RunConfig
from fedmergenet.launcher import processes
from fedmergenet.launcher.federated import run_simulation
from fedmergenet.launcher.processes import free_port
from fedmergenet.models import STUDENT_LAYER, initial_student
from fedmergenet.results import read_metrics, read_summary

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not FASHION.is_dir(), reason="needs dataset-fashion-mnist")]


def tiny_flags(teacher: Path, out: Path, rounds: int) -> list[str]:
    # One adapter layer (the paper's two are in test_fusion.py): half the fusion step and checkpoint.
    return ["--rounds", str(rounds), "--train-limit", "64", "--test-limit", "32", "--batch-size", "16",
            "--adapter-layers", "1", "--teacher-checkpoint", str(teacher), "--output-dir", str(out)]


DP_MODES = ("server-fixed", "client-fixed")  # Flower's wrappers, and its clipping mod in our ClientApp
HUGE = {"fedavg": {}, "fedmedian": {}, "krum": {"byzantine": 1}}  # Krum tolerating one
# Through the real runtime with fusion: FedAvg (with the evaluate phase), FedProx (its mu reaches
# the clients), FedAvgM (server state across rounds) and Bulyan (robust, most constraints).
# test_strategy.py takes every strategy through fusion without the runtime, whose messages are
# the same for all of them.
RUNTIME_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "bulyan")


def experiments() -> list[dict]:
    """Every experiment of the one Flower run below: fusion around four strategies and under DP
    (3 of 5 clients a round), malformed updates, a huge update, and a phase that times out."""
    # The train phase only, except for FedAvg and under DP: every one of Flower's strategies here
    # evaluates with FedAvg's own configure_evaluate / aggregate_evaluate (none overrides them;
    # the DP wrappers do), and each phase is a round trip through Ray for 3 clients.
    train_only = {"skip_federated_eval": True, "recalibrate_bn": False}
    # Round 1's BatchNorm statistics ride with round 2's train replies (under client-side DP
    # too, where Flower's clipping mod must not see them), round 2's come in an evaluate phase.
    folded = {"skip_federated_eval": True}
    matrix = [{"name": f"{name}-fusion", "strategy": name, **({} if name == "fedavg" else train_only)}
              for name in RUNTIME_STRATEGIES]
    matrix += [{"name": f"fedavg-fusion-{mode}", "dp": mode, **folded} for mode in DP_MODES]
    faults = [{"name": "malformed", "fault": "malformed", "clients_per_round": 0, "rounds": 2, **folded}]
    faults += [{"name": f"{name}-huge", "strategy": name, **options, "fusion": False, "fault": "huge",
                "clients_per_round": 0, "rounds": 1, **train_only} for name, options in HUGE.items()]
    # Last: its clients answer after the run has moved on.
    faults += [{"name": "timeout", "fault": "slow", "round_timeout": 1.0, "rounds": 1, **train_only}]
    return matrix + faults


# With test workers side by side (pytest-xdist), the tests reading the one run below share a worker.
shares_the_faults_run = pytest.mark.xdist_group("faults_run")


@pytest.fixture(scope="module")
def faults_run(tmp_path_factory: pytest.TempPathFactory, teacher_file: Path) -> tuple[Path, RunConfig]:
    """One Flower simulation (5 nodes) running every experiment one after another; the tests
    below read its results. Sharing the run spares each experiment the simulation's start-up."""
    import json

    import tomli_w

    tmp = tmp_path_factory.mktemp("faults")
    app = tmp / "matrix"
    shutil.copytree(ROOT / "tests" / "apps" / "matrix", app)
    cfg = RunConfig(dataset="fashion-mnist", device="cpu", train_limit=80, test_limit=32, rounds=2, local_epochs=1,
                    num_clients=5, clients_per_round=3, batch_size=16, fusion_start_round=1, adapter_layers=1,
                    dp_noise_multiplier=0.0, dp_clipping_norm=1e-3,  # read by the DP experiments only
                    teacher_checkpoint=str(teacher_file), output_dir=str(tmp / "out"))
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + tomli_w.dumps(cfg.to_run_config()
                                                               | {"experiments": json.dumps(experiments())}))
    run_simulation(cfg, echo=False, app_dir=app)
    return tmp / "out", cfg


@shares_the_faults_run
def test_malformed_updates_are_rejected_and_the_rest_averaged(faults_run: tuple[Path, RunConfig]) -> None:
    out = faults_run[0] / "malformed"
    rows = [r for r in read_metrics(out) if r["round"] > 0]
    assert [r["rejected"] for r in rows] == [4, 4]  # nodes 1-4 misbehave, node 0 is honest
    assert all(r["round_status"] == "ok" for r in rows)  # each round averaged the sound updates
    reasons = " | ".join(reason for r in rows for reason in r["rejections"])
    for expected in ("NaN or Inf", "tensor names differ", "has shape", "has dtype float64", "num-examples 0",
                     "num-examples 1000000000000"):
        assert expected in reasons
    assert all(reason.startswith("node ") for r in rows for reason in r["rejections"])
    assert read_summary(out)["status"] == "completed"


@shares_the_faults_run
def test_a_round_whose_phase_timed_out_with_no_replies_is_marked(faults_run: tuple[Path, RunConfig]) -> None:
    """Flower ends a phase at its timeout with zero replies and no error; we say so in the round."""
    out = faults_run[0] / "timeout"
    rows = read_metrics(out)
    assert rows[1]["round_status"] == "no_replies"
    assert rows[1]["sampled"] == 3 and rows[1]["replies"] == 0 and rows[1]["fusion_applied"] == 0
    assert rows[1]["test_top1"] == rows[0]["test_top1"]  # the global model was kept
    assert "no sound update" in (faults_run[0] / "flower.log").read_text()
    assert read_summary(out)["rounds_without_update"] == 1


@shares_the_faults_run
def test_strategies_run_two_rounds_with_fusion_and_under_dp(faults_run: tuple[Path, RunConfig]) -> None:
    """Fusion around Flower's strategies in the real runtime: both rounds aggregate and fuse.
    (Without fusion each strategy is Flower's own exactly, and fusion rewrites only its layer of
    each one's aggregate: test_strategy.py checks both for every strategy; the plain path runs end
    to end in the suite test and the robustness test below.)"""
    root, cfg = faults_run
    for name in RUNTIME_STRATEGIES:
        out = root / f"{name}-fusion"
        summary = read_summary(out)
        rows = [r for r in read_metrics(out) if r["round"] > 0]
        assert summary["status"] == "completed", out
        assert summary["arm"] == f"{name}_mergenet"
        assert summary["strategy"]["name"] == name
        assert [r["round_status"] for r in rows] == ["ok", "ok"], out
        assert [r["fusion_applied"] for r in rows] == [1, 1], out
        assert rows[1]["adapter_learned"] == 1, out  # from where the clients took the layer fused in round 1
        assert all(np.isfinite(r["test_loss"]) for r in rows), out
        assert [r["bn_recalibrated"] for r in rows] == ([3, 3] if name == "fedavg" else [0, 0]), out
    assert read_summary(root / "fedavgm-fusion")["strategy"]["hyperparameters"] == {
        "server_learning_rate": 1.0, "server_momentum": 0.0}
    for mode in DP_MODES:
        out = root / f"fedavg-fusion-{mode}"
        summary = read_summary(out)
        assert summary["status"] == "completed" and summary["arm"] == f"fedavg-dp-{mode}_mergenet"
        assert summary["strategy"]["dp"]["mode"] == mode
        assert [r["fusion_applied"] for r in read_metrics(out) if r["round"] > 0] == [1, 1]
        assert [r["bn_recalibrated"] for r in read_metrics(out) if r["round"] > 0] == [3, 3]
        # Clipped to 1e-3 per round with no noise: two rounds moved the weights at most 2e-3
        # (BatchNorm statistics are recomputed after clipping, the fused layer is rewritten).
        final = torch.load(out / "final_model.pt", weights_only=True)
        start = initial_student(cfg).state_dict()
        clipped = [k for k in start if k != STUDENT_LAYER and not k.endswith(("running_mean", "running_var"))]
        assert float(sum((final[k].double() - start[k].double()).pow(2).sum() for k in clipped).sqrt()) <= 2.1e-3


@shares_the_faults_run
def test_robust_strategies_keep_a_huge_update_out_while_fedavg_takes_it_in(faults_run: tuple[Path, RunConfig]) -> None:
    """Node 0 of five sends its update scaled 1000x (finite, well-formed). FedAvg's model
    moves with it; Krum (tolerating one) and FedMedian stay where honest training took them."""
    root, cfg = faults_run
    start = initial_student(cfg).state_dict()
    weights = [name for name in start if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]

    def moved(name: str) -> float:
        final = torch.load(root / f"{name}-huge" / "final_model.pt", weights_only=True)
        return float(sum((final[k] - start[k]).pow(2).sum() for k in weights).sqrt())

    honest_scale = min(moved("fedmedian"), moved("krum"))
    assert moved("fedavg") > 50 * honest_scale
    assert max(moved("fedmedian"), moved("krum")) < 5 * honest_scale


def _runner(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "run_federated_mergenet.py"), *args], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def rows_written(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_server_stopped_mid_run_resumes_without_gaps(tmp_path: Path, teacher_file: Path) -> None:
    out = tmp_path / "run"
    # Fusion from round 1, so the adapter learns in every later round: after the resume too.
    first = _runner(*tiny_flags(teacher_file, out, rounds=4), "--num-clients", "2", "--fusion-start-round", "1")
    try:
        deadline = time.monotonic() + 300
        # Round 1's row is written once round 2's train replies bring its statistics.
        while rows_written(out) < 2:
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.1)
        started = processes.descendants(first.pid)  # the ServerApp and Ray run in sessions of their own
        os.killpg(first.pid, signal.SIGTERM)  # the server goes down in round 2, 3 or 4
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    # Nothing the run started trains on, or writes rounds the resumed run would write again.
    assert not [pid for pid in started if processes.alive(pid)]
    # How far the run got before the stop depends on how fast these tiny rounds are; a tiny
    # round can finish while the signal is on its way, so any unfinished prefix will do.
    done_before = [r["round"] for r in read_metrics(out)]
    assert done_before == list(range(len(done_before))) and 2 <= len(done_before) <= 4, done_before

    second = _runner("--resume", str(out))
    output, _ = second.communicate(timeout=400)
    assert second.returncode == 0, output[-3000:]
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # no gap, no duplicate
    assert read_summary(out)["rounds"] == 4 and read_summary(out)["status"] == "completed"
    assert rows[1]["fusion_applied"] == 1
    # The adapter's state (and the fused layer in flight) survived into the first resumed round.
    assert rows[len(done_before)]["adapter_learned"] == 1
    final = torch.load(out / "final_model.pt", weights_only=True)
    assert final["stage6.2.residual.6.weight"].shape == (160, 960, 1, 1)


def _script(name: str, *args: str, output: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / name), *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if output else subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def running_a_clientapp(client: subprocess.Popen) -> bool:
    for pid in processes.descendants(client.pid):
        with contextlib.suppress(OSError):
            if "flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_text():
                return True
    return False


def test_a_secured_deployment_refuses_strangers_and_survives_a_client_killed_mid_round(
    tmp_path: Path, teacher_file: Path
) -> None:
    """The write-up's separate terminals, secured and faulty, in one deployment run: TLS and
    SuperNode authentication with 3 registered clients and a minimum of 2. A plaintext client
    and a client with an unregistered key are refused; one registered client is killed (-9)
    during the round; the run finishes, fusing the survivors' updates, and they exit by themselves."""
    certs, keys, stranger = tmp_path / "certs", tmp_path / "nodes", tmp_path / "stranger"
    for command in (["make_certificates.sh", "127.0.0.1", str(certs)], ["make_node_keys.sh", "3", str(keys)],
                    ["make_node_keys.sh", "1", str(stranger)]):
        subprocess.run(["bash", str(ROOT / "scripts" / command[0]), *command[1:]], check=True, capture_output=True)
    port = free_port()
    out = tmp_path / "deployed"
    server = _script("federated_mergenet_server.py", "--port", str(port), "--ssl-ca-certfile", str(certs / "ca.crt"),
                     "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
                     "--auth-supernode-keys", str(keys), "--num-clients", "3", "--min-clients", "2",
                     # No evaluate phase: each message starts a fresh ClientApp process, and the
                     # faults under test all happen in the train phase.
                     "--skip-federated-eval", "--no-recalibrate-bn", "--node-wait-timeout", "120",
                     "--fusion-start-round", "1", *tiny_flags(teacher_file, out, rounds=1),
                     output=True)
    client = ["federated_mergenet_client.py", "--num_clients", "3", "--server_address", f"127.0.0.1:{port}",
              "--max-wait-time", "10", "--threads", "1"]
    tls = ["--root-certificates", str(certs / "ca.crt")]
    nodes: list[subprocess.Popen] = []
    strangers: list[subprocess.Popen] = []
    try:
        for line in server.stdout:  # the server says when the SuperLink is up and the keys are registered
            if "waiting for" in line:
                assert "3 node key(s) registered" in line
                break
        plaintext = _script(*client, "--client_id", "2", "--insecure")
        unknown = _script(*client, "--client_id", "2", *tls, "--auth-supernode-private-key", str(stranger / "client_0"))
        strangers = [plaintext, unknown]
        nodes = [_script(*client, "--client_id", str(i), *tls, "--auth-supernode-private-key", str(keys / f"client_{i}"))
                 for i in range(3)]
        deadline = time.monotonic() + 300
        # Node 2 starts a ClientApp process for its first message, round 1's train message (there
        # is no evaluate phase), and needs seconds to import torch before it could reply.
        while not running_a_clientapp(nodes[2]):
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        supernode = int(subprocess.run(["pgrep", "-P", str(nodes[2].pid)], capture_output=True, text=True).stdout.split()[0])
        os.killpg(supernode, signal.SIGKILL)  # the SuperNode with its ClientApp: a crash, no goodbye
        output, _ = server.communicate(timeout=500)
        assert server.returncode == 0, output[-3000:]
        rows = read_metrics(out)
        assert [r["round"] for r in rows] == [0, 1]
        assert rows[1]["sampled"] == 3  # the three registered TLS clients, never the other two
        assert rows[1]["replies"] == 2 and rows[1]["failures"] == 1  # the lost reply is counted
        assert rows[1]["round_status"] == "ok" and rows[1]["fusion_applied"] == 1  # the others' updates, fused
        assert read_summary(out)["status"] == "completed"
        assert plaintext.wait(timeout=90) != 0  # it could not connect and gave up
        assert unknown.wait(timeout=90) != 0  # TLS alone does not let a node in
        for process in nodes[:2]:  # the server is gone: the survivors stop by themselves
            assert process.wait(timeout=60) == 0
        assert (ROOT / "logs" / "federated_mergenet_server.log").is_file()
        assert (ROOT / "logs" / "federated_mergenet_client_0.log").is_file()
    finally:
        for process in [server, *nodes, *strangers]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def test_too_few_clients_stop_the_run_cleanly_after_the_bounded_wait(tmp_path: Path, teacher_file: Path) -> None:
    """Flower would wait forever for the minimum of clients; the server waits --node-wait-timeout."""
    out = tmp_path / "lonely"
    result = subprocess.run(
        [sys.executable, str(ROOT / "federated_mergenet_server.py"), "--insecure", "--port", str(free_port()),
         "--num-clients", "2", "--node-wait-timeout", "5", *tiny_flags(teacher_file, out, rounds=2)],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:]
    assert "only 0 of the 2 required clients connected within 5 s" in result.stderr
    summary = read_summary(out)
    assert summary["status"] == "stopped" and summary["rounds"] == 0
    assert [r["round"] for r in read_metrics(out)] == [0]  # the results so far are kept
