"""Supervising the processes the launcher starts (SuperLink, SuperNodes, ``flwr``): start them
in their own process groups, wait for their ports, follow their output, and stop every one of
them on the way out, even when the launcher itself is killed."""

from __future__ import annotations

import contextlib
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..errors import UserError


class RuntimeFailure(UserError):
    """A Flower process did not start, or a run did not complete."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeFailure(f"{process.args[0]} exited with code {process.returncode} before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.3)
    raise RuntimeFailure(f"nothing listened on {host}:{port} within {timeout:.0f} s")


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process and everything it started, then SIGKILL what is left after ``timeout``.

    Signalling the process group is not enough: Flower's SuperExec starts the ServerApp (and,
    in simulation, Ray) in a session of its own, which would run on, orphaned, training and
    writing results after the launcher said it stopped. So every descendant's group is
    signalled, found before any of them exits and is re-parented out of reach."""
    stop_processes([process], timeout)


def stop_processes(processes: Sequence[subprocess.Popen], timeout: float = 10.0) -> None:
    """``stop_process`` for several processes at once: all are signalled together and share one
    ``timeout``, so that processes slow to end (CUDA clients of an MPS daemon, killed inside
    the driver) cost it once rather than each in turn."""
    running = [process for process in processes if process.poll() is None]
    if not running:
        return
    below = [pid for process in running for pid in descendants(process.pid)]
    groups = {group for group in map(process_group, [*(process.pid for process in running), *below])
              if group not in (None, os.getpgrp())}
    _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (any(process.poll() is None for process in running) or any(map(alive, below))) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_groups(groups, signal.SIGKILL)
    for process in running:
        process.wait(timeout=timeout)


def _signal_groups(groups: Iterable[int], signum: int) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)


def kill_group(process: subprocess.Popen) -> None:
    """Children of a group leader outlive it; sweep the group after the leader is gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); None
    when the process is gone or this is not Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid``, whatever its session (Linux; elsewhere none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _proc_stat(int(entry.name))
        if fields is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    to_visit = [pid]
    while to_visit:
        below = children.get(to_visit.pop(), [])
        found.extend(below)
        to_visit.extend(below)
    return found


def process_group(pid: int) -> int | None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        return os.getpgid(pid)
    return None


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def _die_with_parent() -> None:
    """Linux: deliver SIGTERM to the child when its parent dies, even by SIGKILL."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Processes:
    """Child processes started for a run; all of them are stopped on exit, whatever happens."""

    started: list[subprocess.Popen] = field(default_factory=list)
    logs: list[TextIO] = field(default_factory=list)

    def start(self, command: Sequence[str], log_path: Path | None, env: dict[str, str],
              pipe: bool = False) -> subprocess.Popen:
        """Start in its own process group; output to ``log_path`` (None: this terminal, or a
        pipe to read); it is sent SIGTERM if this process dies without cleaning up."""
        handle = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop_all
            self.logs.append(handle)
        process = subprocess.Popen(
            list(command), stdout=subprocess.PIPE if pipe else handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True, text=pipe or None,
            preexec_fn=_die_with_parent,
        )
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        stop_processes(self.started)
        for process in self.started:
            kill_group(process)
        for handle in self.logs:
            handle.close()


@contextlib.contextmanager
def managed() -> Iterator[Processes]:
    processes = Processes()
    try:
        yield processes
    finally:
        processes.stop_all()


def tee(lines: Iterable[str], log_file: TextIO, echo: bool) -> Iterator[str]:
    """Pass a Flower process's output lines on, each first written to its log (and, with
    ``echo``, to this terminal) at once, so both are current while the caller reads them."""
    for line in lines:
        log_file.write(line)
        log_file.flush()
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        yield line


def follow(command: Sequence[str], env: dict[str, str], log_path: Path, stop_when: Sequence[str], joined: str,
           refused: str) -> int:
    """Run a Flower process in the foreground: its output to this terminal and ``log_path``;
    stopped (with its children) on Ctrl-C, on SIGTERM, or once it prints one of ``stop_when``
    (its children may keep the pipe open after it exits, so the end is read from its words).
    Exit code 0 when it had printed ``joined`` first (it served, then the server left), else 1."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    was_joined = was_refused = False
    with open(log_path, "a", encoding="utf-8") as log_file, managed() as processes:
        process = processes.start(command, None, env, pipe=True)
        assert process.stdout is not None
        with process.stdout:
            for line in tee(process.stdout, log_file, echo=True):
                was_joined = was_joined or joined in line
                was_refused = was_refused or refused in line
                if any(marker in line for marker in stop_when):
                    break
        if was_joined:
            print("The server is gone: this client stopped.", flush=True)
            return 0
        if was_refused:
            print("error: the server refused this client: it authenticates clients and this one's key is not "
                  "registered (--auth-supernode-private-key)", file=sys.stderr, flush=True)
            return 1
        if process.poll() is None or process.returncode == 0:
            print("error: could not connect to the server (wrong address, TLS settings, or not running)",
                  file=sys.stderr, flush=True)
            return 1
        return process.wait()


@contextlib.contextmanager
def environment_with(env: dict[str, str]) -> Iterator[None]:
    """``env`` added to this process's environment for the block, which every process started
    in it inherits (a spawned Python child too); the environment as it was afterwards."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


MPS_QUIT_TIMEOUT_S = 20.0
MPS_CONTROL = "nvidia-cuda-mps-control"  # NVIDIA's program that starts and stops an MPS daemon


@contextlib.contextmanager
def private_mps() -> Iterator[dict[str, str] | None]:
    """The environment that connects a process to a CUDA MPS control daemon of our own, started
    for the block and stopped after it; None where there is none to start. MPS runs several
    processes' kernels on a card at once, where without it they take turns. Its pipe folder is
    a temporary one, so no process outside the block's joins it."""
    control = shutil.which(MPS_CONTROL)
    if control is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="fedmergenet-mps-") as folder:
        env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(folder, "pipe"),
               "CUDA_MPS_LOG_DIRECTORY": os.path.join(folder, "log")}
        for path in env.values():
            os.makedirs(path)
        # The daemon it forks would hold captured pipes open, and run() would wait for them.
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        try:
            started = subprocess.run([control, "-d"], env=os.environ | env, timeout=30, **quiet).returncode == 0
        except (OSError, subprocess.SubprocessError):
            started = False
        try:
            yield env if started else None
        finally:
            if started:
                _quit_mps(control, os.environ | env)


def _quit_mps(control: str, env: dict[str, str]) -> None:
    """Asks the daemon to quit. A daemon that does not answer in time is left to its own end:
    the run it served is over, and its outcome stands."""
    try:
        subprocess.run([control], input=b"quit\n", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=MPS_QUIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        pass
