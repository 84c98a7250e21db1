"""The launcher stops every process a run started, the way Flower starts them: the SuperLink's
SuperExec puts the ServerApp (and Ray) in a session of their own, out of the SuperLink's group."""

from __future__ import annotations

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


def test_a_process_that_has_exited_has_no_descendants_and_stops_at_once() -> None:
    with processes.managed() as children:
        process = children.start([sys.executable, "-c", "pass"], None, env={})
        process.wait(timeout=30)
        assert processes.descendants(process.pid) == [] and not processes.alive(process.pid)
        processes.stop_process(process)
        assert process.returncode == 0
