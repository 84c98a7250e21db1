"""Deployment mode of the runner: the server script and N client scripts as child processes
on this machine (loopback), exactly as a user would start them in separate terminals."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..config import PROJECT_ROOT, RunConfig, to_flags
from ..errors import ConfigError
from . import flwr_cli, processes
from .federated import LOG_DIR


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--server_address must be HOST:PORT (got {address!r})")
    return host, int(port)


def run_deployment(cfg: RunConfig, server_address: str = "127.0.0.1:9092", echo: bool = True) -> Path:
    host, port = split_address(server_address)
    cfg = cfg.anchored(Path.cwd())
    if processes.port_in_use(host, port):
        raise ConfigError(f"port {port} on {host} is already in use; choose another --server_address")
    python = sys.executable
    env = flwr_cli.flwr_env()
    # All clients share this machine's cores: oversubscribed torch threads ran 3-10x slower.
    threads = max(1, (os.cpu_count() or 1) // cfg.num_clients)
    with processes.managed() as children:
        server = children.start(
            [python, str(PROJECT_ROOT / "federated_mergenet_server.py"), "--host", host, "--port", str(port),
             "--insecure", *to_flags(cfg)],
            None if echo else LOG_DIR / "run_server.out", env,
        )
        processes.wait_for_port(host, port, timeout=120, process=server)
        for client_id in range(cfg.num_clients):
            children.start(
                [python, str(PROJECT_ROOT / "federated_mergenet_client.py"), "--client_id", str(client_id),
                 "--num_clients", str(cfg.num_clients), "--server_address", server_address, "--device", cfg.device,
                 "--insecure", "--max-wait-time", "20", "--threads", str(threads)],
                LOG_DIR / f"run_client_{client_id}.out", env,
            )
        code = server.wait()
    if code != 0:
        raise processes.RuntimeFailure(f"the server exited with code {code}; see {LOG_DIR}")
    return Path(cfg.output_dir)
