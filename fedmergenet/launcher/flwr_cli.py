"""Flower's runtimes, driven for the user: the commands of a SuperLink (simulation or
deployment) and SuperNodes, the CLI's connections, and ``flwr run`` with the run's real status.

Flower 1.42 details the scripts own so users never meet them (see the project notes):
one SuperLink port; connections live in ``$FLWR_HOME/config.toml`` (we use a project-local
``.flwr/``); runtime dependency installation must be off; ``flwr run --stream`` exits 0
even when the run failed, so the status is read back with ``flwr ls``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from ..atomic import write_text
from ..config import PROJECT_ROOT
from .processes import RuntimeFailure, _die_with_parent, stop_process, tee


@dataclass(frozen=True)
class Tls:
    """Certificates for TLS between SuperNodes, the CLI and the SuperLink (None = plaintext)."""

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None


FLWR_HOME = PROJECT_ROOT / ".flwr"
# Offline and quiet; no runtime dependency installation (the SuperLink would otherwise download
# a CUDA torch into a fresh environment for every run).
FLOWER_SETTINGS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
ACTIVATE_MARKER = "# federated MergeNet: Flower's settings for `flwr run .` in this project"


def flwr_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for every Flower process: project-local home, offline, quiet, no installs."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home or FLWR_HOME)
    env.update(FLOWER_SETTINGS)
    env["PYTHONUNBUFFERED"] = "1"
    # The package must import from the ServerApp/ClientApp processes wherever they run.
    env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _read_flower_config(flwr_home: Path) -> dict[str, Any]:
    path = flwr_home / "config.toml"
    return tomllib.loads(path.read_text()) if path.exists() else {}


@contextlib.contextmanager
def _flower_config(flwr_home: Path) -> Iterator[dict[str, Any]]:
    """``$FLWR_HOME/config.toml`` to change in place: runs started side by side each add and
    remove their own connection, so every change holds a lock from read to write, and the
    write replaces the file whole (the CLI of another run may be reading it)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    with open(flwr_home / ".config.toml.lock", "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        config = _read_flower_config(flwr_home)
        before = tomli_w.dumps(config)
        yield config
        after = tomli_w.dumps(config)
        if after != before:
            write_text(flwr_home / "config.toml", after)


def write_connection(flwr_home: Path, name: str, address: str, tls: Tls | None) -> None:
    """Add or replace ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``, keeping the others."""
    entry: dict[str, Any] = {"address": address}
    if tls is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(tls.ca_cert).resolve())
    with _flower_config(flwr_home) as config:
        config.setdefault("superlink", {})[name] = entry


def configure_project(venv: Path, federation: dict[str, Any], flwr_home: Path = FLWR_HOME) -> None:
    """What plain ``flwr run .`` needs, written by the set-up: the virtualenv's activate script
    exports Flower's settings, and the project's Flower home has a local simulation connection
    (the CLI's default) with ``federation``'s settings (``--federation-config`` keys). Idempotent."""
    activate = venv / "bin" / "activate"
    if activate.is_file() and ACTIVATE_MARKER not in activate.read_text():
        exports = " ".join(f"{k}={v}" for k, v in {"FLWR_HOME": f'"{flwr_home}"', **FLOWER_SETTINGS}.items())
        with open(activate, "a", encoding="utf-8") as script:
            script.write(f"\n{ACTIVATE_MARKER}\nexport {exports}\n")
    with _flower_config(flwr_home) as config:
        superlink = config.setdefault("superlink", {})
        superlink.setdefault("default", "local")
        if "options" not in superlink.get("local", {}):
            superlink["local"] = {"address": ":local:", "options": simulation_options(federation)}


def simulation_options(federation: dict[str, Any]) -> dict[str, Any]:
    """``--federation-config`` keys (client-resources-num-cpus, ...) as a connection's nested options."""
    options: dict[str, Any] = {}
    for key, value in federation.items():
        for table in ("client-resources", "init-args"):
            if key.startswith(table + "-"):
                options.setdefault("backend", {}).setdefault(table, {})[key[len(table) + 1:]] = value
                break
        else:
            options[key] = value
    return options


def remove_connection(flwr_home: Path, name: str) -> None:
    """Forget a connection made for one run, so config.toml does not grow with every run."""
    with _flower_config(flwr_home) as config:
        config.get("superlink", {}).pop(name, None)


def superlink_command(host: str, port: int, simulation: bool, tls: Tls | None, log_file: Path,
                      node_auth: bool = False) -> list[str]:
    # In-memory state: our own server_state.pt is what a resume needs, and Flower's SQLite
    # state made each 9 MB model message take tens of seconds to pass through the SuperLink.
    command = [
        "flower-superlink", "--host", host, "--port", str(port),
        "--disable-runtime-dependency-installation", "--log-file", str(log_file),
    ]
    if simulation:
        command += ["--simulation", "--isolation", "subprocess"]
    if tls is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                    "--ssl-keyfile", str(tls.server_key)]
    if node_auth:
        command.append("--enable-supernode-auth")  # only registered public keys may join
    return command


def supernode_command(superlink: str, port: int, partition_id: int, num_partitions: int, device: str,
                      tls: Tls | None, max_wait_time: float = 60.0, auth_key: Path | None = None,
                      threads: int = 0) -> list[str]:
    node_config = f"partition-id={partition_id} num-partitions={num_partitions} device='{device}' threads={threads}"
    command = [
        "flower-supernode", "--superlink", superlink, "--port", str(port), "--node-config", node_config,
        # When the server is gone, give up reconnecting instead of hanging in the terminal.
        "--max-wait-time", str(max_wait_time),
    ]
    if tls is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(tls.ca_cert)]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    return command


# Flower's own `flwr supernode register KEY CONNECTION`, once per key, in one interpreter:
# a `flwr` process per key costs ~2 s each, and a client whose key is not registered yet
# when it first knocks is turned away.


_REGISTER = """
import sys
from flwr.cli.app import app
connection, keys = sys.argv[1], sys.argv[2:]
for key in keys:
    try:
        app(["supernode", "register", key, connection], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            sys.exit(f"could not register node key {key} (exit code {exc.code})")
    except Exception as exc:
        sys.exit(f"could not register node key {key}: {exc}")
"""


def register_nodes(connection: str, public_keys: Sequence[Path], env: dict[str, str]) -> None:
    """Let the holders of these public keys join a SuperLink started with node authentication."""
    if not public_keys:
        return
    result = subprocess.run([sys.executable, "-c", _REGISTER, connection, *map(str, public_keys)],
                            capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL,
                            timeout=300)
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise RuntimeFailure(detail[-1] if detail else "could not register the node keys")


def write_run_config(path: Path, run_config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(run_config))
    return path


# What Flower 1.42 can put in an app bundle (FAB); everything else is filtered out anyway.


FAB_SUFFIXES = {".py", ".toml", ".md", ".yaml", ".json"}


def stage_app(app_dir: Path, into: Path) -> Path:
    """A copy of the app holding only files a bundle can hold, outside hidden folders.

    ``flwr run`` walks and resolves every file under the app folder before filtering; in a
    project with its virtualenv inside that took ~6 s per run. Flower still applies its own
    rules (.gitignore, ``fab-include``) to the copy, so the bundle is the same.
    """
    for dirpath, dirnames, filenames in os.walk(app_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            source = Path(dirpath) / name
            if (source.suffix in FAB_SUFFIXES or name == ".gitignore") and not source.is_symlink():
                target = into / source.relative_to(app_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
    return into


def flwr_run(app_dir: Path, connection: str, run_config_file: Path, env: dict[str, str], log_path: Path,
             echo: bool = True, federation_config: dict[str, Any] | None = None) -> int:
    """Submit the app, stream its log to the console and ``log_path``; returns the run id."""
    with tempfile.TemporaryDirectory(prefix="fedmergenet-app-") as staged:
        return _flwr_run(stage_app(Path(app_dir), Path(staged)), connection, run_config_file, env, log_path, echo,
                         federation_config)


def _flwr_run(app_dir: Path, connection: str, run_config_file: Path, env: dict[str, str], log_path: Path,
              echo: bool, federation_config: dict[str, Any] | None) -> int:
    command = [
        "flwr", "run", str(app_dir), connection, "--run-config", str(run_config_file), "--stream",
    ]
    if federation_config:
        command += ["--federation-config", " ".join(f"{k}={v}" for k, v in federation_config.items())]
    run_id = None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                   stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        try:
            assert process.stdout is not None
            with process.stdout:
                for line in tee(process.stdout, log_file, echo):
                    if run_id is None and "run" in line.lower():
                        run_id = _run_id_from(line) or run_id
            process.wait()
        finally:
            stop_process(process)
    if process.returncode != 0:
        raise RuntimeFailure(f"flwr run exited with code {process.returncode}; see {log_path}")
    if run_id is None:
        raise RuntimeFailure(f"flwr run did not report a run id; see {log_path}")
    return run_id


def _run_id_from(line: str) -> int | None:
    """``flwr run`` prints 'Successfully started run <id>'."""
    words = line.replace(":", " ").split()
    for i, word in enumerate(words[:-1]):
        if word.lower() == "run" and words[i + 1].isdigit():
            return int(words[i + 1])
    return None


def run_status(connection: str, run_id: int, env: dict[str, str]) -> str:
    """The run's real final status (``finished:completed``, ``finished:failed``, ...)."""
    result = subprocess.run(["flwr", "ls", connection, "--run-id", str(run_id), "--format", "json"],
                            capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL,
                            timeout=60)
    try:
        runs = json.loads(result.stdout).get("runs", [])
    except json.JSONDecodeError:
        return "unknown"
    for run in runs:
        if int(run.get("run-id", run.get("run_id", -1))) == run_id:
            return str(run.get("status", "unknown"))
    return "unknown"
