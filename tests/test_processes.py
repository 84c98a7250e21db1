"""The launcher stops every process a run started, the way Flower starts them: the SuperLink's
SuperExec puts the ServerApp (and Ray) in a session of their own, out of the SuperLink's group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmergenet.launcher import processes

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")

# A parent that starts a child in a new session, as flower-superexec does, and says its pid.
STARTS_A_SESSION = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""
IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(0, flush=True); time.sleep(120)"


def start(code: str, children: processes.Processes) -> tuple[subprocess.Popen, int]:
    process = children.start([sys.executable, "-c", code], None, env={}, pipe=True)
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def test_a_child_started_in_a_session_of_its_own_is_stopped_with_its_parent() -> None:
    with processes.managed() as children:
        parent, grandchild = start(STARTS_A_SESSION, children)
        assert processes.descendants(parent.pid) == [grandchild]
        assert processes.process_group(grandchild) != processes.process_group(parent.pid)
    assert parent.poll() == -signal.SIGTERM
    assert not processes.alive(grandchild)


def test_a_process_ignoring_sigterm_is_killed_once_the_timeout_is_up() -> None:
    with processes.managed() as children:
        process, _ = start(IGNORES_SIGTERM, children)
        started = time.monotonic()
        processes.stop_process(process, timeout=0.5)
        assert process.returncode == -signal.SIGKILL
        assert time.monotonic() - started < 5


def test_processes_ignoring_sigterm_share_one_timeout_rather_than_each_waiting_in_turn() -> None:
    """A run's processes are stopped together: three that ignore SIGTERM (as CUDA clients of an
    MPS daemon can take long to go) cost the timeout once, not three times."""
    with processes.managed() as children:
        stubborn = [start(IGNORES_SIGTERM, children)[0] for _ in range(3)]
        started = time.monotonic()
        processes.stop_processes(stubborn, timeout=2.0)
        elapsed = time.monotonic() - started
        assert [process.returncode for process in stubborn] == [-signal.SIGKILL] * 3
        assert 2.0 <= elapsed < 5.0  # in turn: at least 6 s


def test_a_process_that_has_exited_has_no_descendants_and_stops_at_once() -> None:
    with processes.managed() as children:
        process = children.start([sys.executable, "-c", "pass"], None, env={})
        process.wait(timeout=30)
        assert processes.descendants(process.pid) == [] and not processes.alive(process.pid)
        processes.stop_process(process)
        assert process.returncode == 0


FAKE_MPS_CONTROL = """#!/bin/sh
# Stands in for NVIDIA's nvidia-cuda-mps-control: records how it was called and with which pipe folder.
echo "$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(cat)" >> "$MPS_CALLS"
"""


def on_path_as_mps_control(script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``script`` installed as the only ``nvidia-cuda-mps-control`` on the PATH."""
    control = tmp_path / "bin" / "nvidia-cuda-mps-control"
    control.parent.mkdir()
    control.write_text(script)
    control.chmod(0o755)
    monkeypatch.setenv("PATH", f"{control.parent}:/usr/bin:/bin")


def test_a_private_mps_daemon_is_started_for_the_block_and_stopped_after(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon gets a pipe folder of its own (no process outside the block joins it), and
    is told to quit on the way out; without NVIDIA's control program there is none."""
    on_path_as_mps_control(FAKE_MPS_CONTROL, tmp_path, monkeypatch)
    calls = tmp_path / "calls"
    monkeypatch.setenv("MPS_CALLS", str(calls))

    with processes.private_mps() as env:
        assert env is not None and Path(env["CUDA_MPS_PIPE_DIRECTORY"]).is_dir()
        pipe = env["CUDA_MPS_PIPE_DIRECTORY"]
        assert calls.read_text().splitlines() == [f"-d pipe={pipe} stdin="]
    assert calls.read_text().splitlines()[1:] == [f" pipe={pipe} stdin=quit"]
    assert not Path(pipe).exists()  # the temporary folder is gone

    monkeypatch.setenv("PATH", "/nonexistent")
    with processes.private_mps() as env:
        assert env is None


DAEMON_MPS_CONTROL = """#!/bin/sh
# Forks a daemon that keeps the standard streams it inherited, as a real control daemon may;
# asked to quit, it never answers.
if [ "$1" = "-d" ]; then
    sleep 60 &
    echo $! > "$MPS_DAEMON"
    exit 0
fi
exec sleep 60
"""


def test_a_private_mps_daemon_that_keeps_its_streams_or_never_quits_holds_nothing_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting does not wait for the forked daemon's streams to close, and a daemon that does
    not answer ``quit`` is left to itself: the block's own outcome stands."""
    on_path_as_mps_control(DAEMON_MPS_CONTROL, tmp_path, monkeypatch)
    daemon = tmp_path / "daemon.pid"
    monkeypatch.setenv("MPS_DAEMON", str(daemon))
    monkeypatch.setattr(processes, "MPS_QUIT_TIMEOUT_S", 0.5)
    try:
        with pytest.raises(KeyError, match="the block's own error"):
            with processes.private_mps() as env:
                assert env is not None  # started, not given up after the start's timeout
                raise KeyError("the block's own error")
    finally:
        os.kill(int(daemon.read_text()), signal.SIGKILL)


def test_mps_on_a_machine_without_it_is_one_line_and_exit_2_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from fedmergenet.cli import runner_main

    monkeypatch.setenv("PATH", "/nonexistent")
    assert runner_main(["--mps", "--random-teacher", "--output-dir", str(tmp_path / "run")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--mps needs NVIDIA's nvidia-cuda-mps-control" in errors[0]
    assert not (tmp_path / "run").exists()


def test_with_mps_every_process_the_run_starts_joins_its_daemon_and_the_daemon_stops_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--mps``: the runner's children (the suite's arms, the SuperLink and through it Ray's
    actors) inherit the daemon's pipe folder; afterwards the runner's environment is as it was
    and the daemon is told to quit. The run itself is stood in for by one child process."""
    import fedmergenet.cli as cli

    on_path_as_mps_control(FAKE_MPS_CONTROL, tmp_path, monkeypatch)
    calls = tmp_path / "calls"
    monkeypatch.setenv("MPS_CALLS", str(calls))
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    seen: list[str] = []

    def run(args, cfg) -> int:
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['CUDA_MPS_PIPE_DIRECTORY'])"],
                               capture_output=True, text=True, check=True, timeout=60)
        seen.append(child.stdout.strip())
        return 0

    monkeypatch.setattr(cli, "_run", run)
    assert cli.runner_main(["--mps", "--random-teacher", "--output-dir", str(tmp_path / "run")]) == 0
    pipe = seen[0]
    assert pipe.endswith("pipe") and calls.read_text().splitlines() == [f"-d pipe={pipe} stdin=",
                                                                        f" pipe={pipe} stdin=quit"]
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
