"""The launcher start_federated_experiment.sh, driven the way a user would drive it.

Every call points FEDMERGENET_VENV at the project's existing virtual environment, so nothing
is installed, closes stdin (so the interactive menu can never wait on `read`) and has a
timeout. None of these tests starts training: they stop at usage errors, `help`, `setup`,
or a `compare` on an empty results folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "start_federated_experiment.sh"
VENV = ROOT / ".venv"  # the project's existing virtual environment: nothing gets installed
SUBCOMMANDS = ["quick", "suite", "paper", "server", "client", "compare", "bench", "setup", "help"]


def launch(*args: str, script: Path = SCRIPT, timeout: float = 20) -> subprocess.CompletedProcess:
    """./start_federated_experiment.sh ARGS with stdin closed and the existing venv."""
    env = {**os.environ, "FEDMERGENET_VENV": str(VENV)}
    return subprocess.run(
        ["bash", str(script), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_venv_is_the_projects():
    assert (VENV / "bin" / "python").exists()


def test_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=20)


SHELL_SCRIPTS = [SCRIPT, *sorted((ROOT / "scripts").glob("*.sh")), ROOT / ".ci" / "run"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (CI installs Debian's)")
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_shellcheck_passes(script: Path):
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_lists_subcommands():
    for flag in ("help", "-h", "--help"):
        result = launch(flag)
        assert result.returncode == 0, result.stderr
        for sub in SUBCOMMANDS:
            assert sub in result.stdout


def test_no_subcommand_without_terminal_prints_usage_and_exits_2():
    # stdin is /dev/null, not a terminal: no menu, no `read`, no hang.
    result = launch(timeout=20)
    assert result.returncode == 2
    assert "Usage:" in result.stderr
    assert "quick" in result.stderr


def test_unknown_subcommand_exits_2():
    result = launch("train-everything")
    assert result.returncode == 2
    assert "unknown subcommand" in result.stderr
    assert "Usage:" in result.stderr


@pytest.mark.parametrize("args", [["client"], ["client", "abc"], ["client", "--device", "cpu"]])
def test_client_needs_numeric_id(args):
    # Checked by the launcher itself, before any Python entry point is looked at.
    result = launch(*args)
    assert result.returncode == 2
    assert "client id" in result.stderr


def test_compare_on_empty_results_is_a_one_line_error(tmp_path):
    results, out = tmp_path / "results", tmp_path / "comparison"
    results.mkdir()
    result = launch("compare", str(results), "--out", str(out))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr


def test_setup_reuses_existing_venv_and_creates_nothing(tmp_path):
    # A copy of the launcher in an empty folder: setup must not create logs/, results/,
    # checkpoints/ or a .venv there, nor touch the venv it reuses.
    script = tmp_path / SCRIPT.name
    shutil.copy2(SCRIPT, script)
    venv_bin_before = sorted(p.name for p in (VENV / "bin").iterdir())
    result = launch("setup", script=script)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [script.name]
    assert sorted(p.name for p in (VENV / "bin").iterdir()) == venv_bin_before


def test_pip_is_only_ever_the_venvs():
    # Never a bare `pip install` (which could hit the system Python).
    lines = [line.strip() for line in SCRIPT.read_text().splitlines()]
    pip_lines = [line for line in lines if re.search(r"\bpip3?\b[\"']?\s+install", line)]
    assert pip_lines, "the launcher installs requirements into a fresh venv"
    for line in pip_lines:  # the venv's pip, or the venv's uv (told VIRTUAL_ENV="$VENV" on the line before)
        assert line.removeprefix("if ! ").startswith(('"$VENV/bin/pip" install', '"$VENV/bin/uv" pip install')), line
    assert 'VIRTUAL_ENV="$VENV"' in SCRIPT.read_text()


def test_simulated_clients_training_on_cuda_share_the_gpus():
    """Flower's simulation settings the runner passes: with GPUs each sampled client holds an
    equal share of them (Ray hides the cards from actors holding none); CPU clients hold none."""
    from fedmergenet.config import RunConfig
    from fedmergenet.launcher.federated import federation_config

    cfg = RunConfig(num_clients=5, clients_per_round=3, device="auto")
    cpu_only = federation_config(cfg, 1, gpus=0)
    assert cpu_only == {"num-supernodes": 5, "client-resources-num-cpus": 1,
                        "init-args-num-cpus": max(os.cpu_count() or 1, 3)}
    shared = federation_config(cfg, 1, gpus=1)
    assert shared == cpu_only | {"client-resources-num-gpus": 0.3333, "init-args-num-gpus": 1}
    assert 3 * shared["client-resources-num-gpus"] <= 1  # all three fit on the card at once
    assert federation_config(cfg.replace(device="cpu"), 1, gpus=1) == cpu_only
    assert federation_config(cfg, 1, gpus=8)["client-resources-num-gpus"] == 1.0


@pytest.mark.parametrize(("clients", "threads", "cores", "offered"), [
    (3, 1, 2, 3),     # the quick preset: all three at once, no core idle in a second wave
    (4, 1, 2, 2),     # two full waves
    (30, 1, 2, 2),    # 30 per round: waves of 2, not 30 actors of ~1.2 GiB each
    (20, 1, 16, 20),  # a second wave of 4 would leave 12 cores idle
    (15, 1, 16, 16),  # fewer clients than cores: the cores
    (3, 2, 2, 2),     # two-thread clients: never oversubscribed
])
def test_ray_is_offered_cpus_for_a_round_without_an_actor_per_client(clients, threads, cores, offered):
    from fedmergenet.config import RunConfig
    from fedmergenet.launcher.federated import ray_cpus

    cfg = RunConfig(num_clients=50, clients_per_round=clients)
    assert ray_cpus(cfg, threads, cores=cores) == offered


def test_the_set_up_prepares_plain_flwr_run(tmp_path):
    """configure_project: the activate script exports Flower's settings once, and the local
    simulation connection gets the runner's settings as Flower's nested options."""
    import tomllib

    from fedmergenet.launcher.flwr_cli import ACTIVATE_MARKER, configure_project

    venv, home = tmp_path / "venv", tmp_path / "flwr"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("# the venv's own script\n")
    federation = {"num-supernodes": 3, "client-resources-num-cpus": 1, "client-resources-num-gpus": 0.3333,
                  "init-args-num-cpus": 3, "init-args-num-gpus": 1}
    for _ in range(2):
        configure_project(venv, federation, flwr_home=home)
    activate = (venv / "bin" / "activate").read_text()
    assert activate.count(ACTIVATE_MARKER) == 1
    assert f'FLWR_HOME="{home}"' in activate and "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in activate
    config = tomllib.loads((home / "config.toml").read_text())["superlink"]
    assert config["default"] == "local" and config["local"]["address"] == ":local:"
    assert config["local"]["options"] == {"num-supernodes": 3, "backend": {
        "client-resources": {"num-cpus": 1, "num-gpus": 0.3333}, "init-args": {"num-cpus": 3, "num-gpus": 1}}}


def test_runs_started_side_by_side_keep_each_others_flower_connections(tmp_path):
    """Each run adds its SuperLink connection to $FLWR_HOME/config.toml and removes it at the end;
    runs started at once (several terminals, the tests' workers) lose none of the others'."""
    import tomllib
    from concurrent.futures import ThreadPoolExecutor

    from fedmergenet.launcher.flwr_cli import remove_connection, write_connection

    home = tmp_path / "flwr-home"
    names = [f"run-{i}" for i in range(40)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda name: write_connection(home, name, f"127.0.0.1:{9000 + int(name[4:])}", tls=None), names))
    config = tomllib.loads((home / "config.toml").read_text())
    assert sorted(config["superlink"]) == sorted(names)
    assert config["superlink"]["run-7"] == {"address": "127.0.0.1:9007", "insecure": True}
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda name: remove_connection(home, name), names[::2]))
    assert sorted(tomllib.loads((home / "config.toml").read_text())["superlink"]) == sorted(names[1::2])


def test_flower_is_asked_for_the_runs_status_only_to_explain_an_arm_that_did_not_complete(tmp_path, monkeypatch):
    """Our ServerApp writes each arm's summary last: when all say completed the run is done, with
    no `flwr ls` process; otherwise Flower's status is asked for, and the error names it."""
    from fedmergenet.config import RunConfig
    from fedmergenet.launcher import federated
    from fedmergenet.launcher.processes import RuntimeFailure
    from fedmergenet.results import write_summary

    cfg = RunConfig(output_dir=str(tmp_path), fusion_arms="plain mergenet")
    asked: list[int] = []
    monkeypatch.setattr(federated, "wait_status", lambda connection, run_id, env: asked.append(run_id) or "finished:failed")
    for run in cfg.arm_runs():
        Path(run.output_dir).mkdir(parents=True)
        write_summary(Path(run.output_dir), {"arm": run.arm, "best_top1": 0.5, "final_top1": 0.5, "config": {},
                                             "status": "completed"})
    status = federated.final_status(cfg, "link", 7, {})
    assert asked == [] and federated.finish(cfg, status, tmp_path / "flower.log") == tmp_path

    last = cfg.arm_runs()[-1]
    write_summary(Path(last.output_dir), {"arm": last.arm, "best_top1": 0.5, "final_top1": 0.5, "config": {},
                                          "status": "stopped"})
    status = federated.final_status(cfg, "link", 7, {})
    assert asked == [7]
    with pytest.raises(RuntimeFailure, match="Flower reports the run as finished:failed"):
        federated.finish(cfg, status, tmp_path / "flower.log")
