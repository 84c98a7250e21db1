"""Run the Flower app: in Flower's simulation engine, or as a SuperLink that real SuperNodes
(our client script, other terminals, other machines) join."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

from ..checks import check_run
from ..config import PROJECT_ROOT, RunConfig
from ..errors import ConfigError
from ..results import read_summary
from . import flwr_cli, processes
from .flwr_cli import Tls

LOG_DIR = PROJECT_ROOT / "logs"


def preflight(cfg: RunConfig) -> RunConfig:
    """Every check that can fail fast, before any process starts or any client trains."""
    cfg = cfg.anchored(Path.cwd())  # command-line paths are the user's, relative to where they are
    cfg = check_run(cfg, Path(cfg.output_dir), teacher=True)
    record_partitions(cfg, Path(cfg.output_dir))
    return cfg


def record_partitions(cfg: RunConfig, out: Path, echo: bool = True) -> None:
    """Each client's size and label histogram, as data (partitions.json) and on the console."""
    import json

    from ..data import format_partition_report, partition_report
    from ..data.splits import client_partitions, train_set

    dataset = train_set(cfg)
    report = partition_report(dataset.labels, client_partitions(cfg), dataset.num_classes)
    (out / "partitions.json").write_text(json.dumps(report, indent=1) + "\n")
    if echo:
        print(format_partition_report(report), flush=True)


FLOWER_COMPLETED = "finished:completed"


def summary_or_empty(run: RunConfig) -> dict:
    """An arm's summary, or {} when its ServerApp never wrote a readable one."""
    try:
        return read_summary(Path(run.output_dir))
    except ValueError:
        return {}


def arms_completed(cfg: RunConfig) -> bool:
    """Whether every arm's summary says completed: our ServerApp writes it as its last act."""
    return all(summary_or_empty(run).get("status") == "completed" for run in cfg.arm_runs())


def final_status(cfg: RunConfig, connection: str, run_id: int, env: dict[str, str]) -> str:
    """Flower's word on the run is needed only to explain one that did not complete: asking
    it costs a CLI process (seconds) on every run otherwise."""
    return FLOWER_COMPLETED if arms_completed(cfg) else wait_status(connection, run_id, env)


def finish(cfg: RunConfig, status: str, log_path: Path) -> Path:
    """The output folder, once Flower reports the run completed and so does each arm's summary."""
    for run in cfg.arm_runs():
        summary = summary_or_empty(run)
        if status != FLOWER_COMPLETED or summary.get("status") != "completed":
            reason = summary.get("error") or (f"Flower reports the run as {status}"
                                              if summary or status != FLOWER_COMPLETED
                                              else "the ServerApp stopped before writing a summary")
            raise processes.RuntimeFailure(f"the federated run did not complete: {reason}; log: {log_path}")
    return Path(cfg.output_dir)


def run_simulation(cfg: RunConfig, num_cpus_per_client: int = 1, echo: bool = True, app_dir: Path = PROJECT_ROOT) -> Path:
    """The whole federation in Flower's simulation engine, on this machine."""
    cfg = preflight(cfg)
    if cfg.client_threads == 0:
        cfg = cfg.replace(client_threads=num_cpus_per_client)  # each Ray actor holds this many CPUs
    env = flwr_cli.flwr_env()
    port = processes.free_port()
    name = f"fedmergenet-sim-{port}"
    out = Path(cfg.output_dir)
    log_path = out / "flower.log"
    federation = federation_config(cfg, num_cpus_per_client, visible_gpus())
    flwr_cli.write_connection(Path(env["FLWR_HOME"]), name, f"127.0.0.1:{port}", tls=None)
    run_config = flwr_cli.write_run_config(out / "run_config.toml", cfg.to_run_config())
    with processes.managed() as children:
        link = children.start(
            flwr_cli.superlink_command("127.0.0.1", port, simulation=True, tls=None,
                                      log_file=out / "superlink.log"),
            out / "superlink.out", env,
        )
        processes.wait_for_port("127.0.0.1", port, timeout=60, process=link)
        run_id = flwr_cli.flwr_run(app_dir, name, run_config, env, log_path, echo=echo,
                                  federation_config=federation)
        status = final_status(cfg, name, run_id, env)
    flwr_cli.remove_connection(Path(env["FLWR_HOME"]), name)
    return finish(cfg, status, log_path)


def federation_config(cfg: RunConfig, num_cpus_per_client: int, gpus: int) -> dict[str, int | float]:
    """Flower's simulation settings for a run: a SuperNode per client, a CPU per sampled client
    (ray_cpus) and, when the clients train on CUDA and there are ``gpus``, an equal share of the
    cards for each sampled client, so they all train on them at once. Ray hides the GPUs from an
    actor that holds no share of one: without this the clients would train on the CPU."""
    config: dict[str, int | float] = {"num-supernodes": cfg.num_clients,
                                      "client-resources-num-cpus": num_cpus_per_client,
                                      "init-args-num-cpus": ray_cpus(cfg, num_cpus_per_client)}
    if gpus > 0 and cfg.device != "cpu":
        share = min(1.0, math.floor(10_000 * gpus / cfg.sample_size) / 10_000)  # Ray's 4-decimal resolution
        config |= {"client-resources-num-gpus": share, "init-args-num-gpus": gpus}
    return config


def configure_flwr_run(venv: Path) -> None:
    """The set-up's step for plain ``flwr run .``: Flower's settings in the virtualenv, and a local
    simulation like the runner's for the presets' 3 clients, sharing this machine's GPUs if any."""
    flwr_cli.configure_project(venv, federation_config(RunConfig(), num_cpus_per_client=1, gpus=visible_gpus()))


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def ray_cpus(cfg: RunConfig, num_cpus_per_client: int, cores: int | None = None) -> int:
    """CPUs Ray may hand out, which bounds the actors started (each ~1.2 GiB with torch). Ray
    runs a round's clients in waves of as many as it has CPUs for; a second, partly empty wave
    of one-thread clients (3 on 2 cores) leaves cores idle, so fewer than twice the cores'
    worth all train at once and the OS shares the cores. With more, the waves keep the cores
    busy and more actors than cores only cost time and memory (measured: BENCHMARKS.md, 3).
    Clients with several threads get only the cores: oversubscribed, their threads spin-wait."""
    cores = cores or os.cpu_count() or 1
    if num_cpus_per_client > 1:
        return max(cores, num_cpus_per_client)
    return cfg.sample_size if cores < cfg.sample_size < 2 * cores else cores


def wait_status(connection: str, run_id: int, env: dict[str, str], timeout: float = 30.0) -> str:
    """The stream can end a moment before the SuperLink marks the run finished."""
    deadline = time.monotonic() + timeout
    status = flwr_cli.run_status(connection, run_id, env)
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
        status = flwr_cli.run_status(connection, run_id, env)
    return status


def serve(cfg: RunConfig, host: str = "127.0.0.1", port: int = 9092, tls: Tls | None = None, echo: bool = True,
          node_keys: Sequence[Path] = ()) -> Path:
    """Deployment runtime: start a SuperLink, let SuperNodes join, submit this app, stream it.
    With ``node_keys`` only SuperNodes holding one of these keys' private halves may join."""
    if node_keys and tls is None:
        raise ConfigError("SuperNode authentication needs TLS: pass the certificate options instead of --insecure")
    cfg = preflight(cfg)
    if processes.port_in_use(host, port):
        raise ConfigError(f"port {port} on {host} is already in use; choose another with --port")
    env = flwr_cli.flwr_env()
    name = f"fedmergenet-{host.replace('.', '-')}-{port}"
    out = Path(cfg.output_dir)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / "federated_mergenet_server.log"
    address = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    flwr_cli.write_connection(Path(env["FLWR_HOME"]), name, address, tls=tls)
    run_config = flwr_cli.write_run_config(out / "run_config.toml", cfg.to_run_config())
    with processes.managed() as children:
        link = children.start(
            flwr_cli.superlink_command(host, port, simulation=False, tls=tls,
                                      log_file=LOG_DIR / "superlink.log", node_auth=bool(node_keys)),
            LOG_DIR / "superlink.out", env,
        )
        processes.wait_for_port(address.split(":")[0], port, timeout=60, process=link)
        flwr_cli.register_nodes(name, node_keys, env)
        if echo:  # only now: a client knocking before its key is registered is turned away
            authenticated = f", {len(node_keys)} node key(s) registered" if node_keys else ""
            print(f"SuperLink listening on {host}:{port}{authenticated}; waiting for {cfg.min_available} client(s) "
                  f"(up to {cfg.node_wait_timeout:.0f} s)", flush=True)
        run_id = flwr_cli.flwr_run(PROJECT_ROOT, name, run_config, env, log_path, echo=echo)
        status = final_status(cfg, name, run_id, env)
    flwr_cli.remove_connection(Path(env["FLWR_HOME"]), name)
    return finish(cfg, status, log_path)


def join(client_id: int, num_clients: int, server_address: str, device: str = "cpu", port: int = 0,
         tls: Tls | None = None, max_wait_time: float = 60.0, auth_key: Path | None = None, threads: int = 0) -> int:
    """Run one SuperNode serving partition ``client_id`` of ``num_clients`` until the server goes away."""
    if not 0 <= client_id < num_clients:
        raise ConfigError(f"--client_id {client_id} must be in 0..{num_clients - 1} for --num_clients {num_clients}")
    if device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"unknown device {device!r}; choose one of cpu, cuda, auto")
    env = flwr_cli.flwr_env()
    port = port or processes.free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"federated_mergenet_client_{client_id}.log"
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = all cores), got {threads}")
    command = flwr_cli.supernode_command(server_address, port, client_id, num_clients, device, tls, max_wait_time,
                                        auth_key, threads)
    print(f"Client {client_id}/{num_clients} joining {server_address}; log: {log_path}", flush=True)
    return processes.follow(command, env, log_path, stop_when=(GAVE_UP, EXITED), joined=JOINED, refused=REFUSED)


# What flower-supernode 1.42 logs when the SuperLink stayed away past --max-wait-time; the
# process itself then lingers, so the client script stops it.
GAVE_UP = "Giving up reconnection"
EXITED = "Exit Code:"  # flower-supernode's fatal errors; its SuperExec child may linger
REFUSED = "Failed to activate SuperNode"  # the SuperLink authenticates nodes and this key is unknown
JOINED = "SuperNode ID:"
