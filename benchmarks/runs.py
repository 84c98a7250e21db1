"""Measurements on real Flower simulation runs: server overhead per round, the runtime's
overhead against the same training done in one process, peak memory per process, and how
the round time grows with the number of clients per round."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmergenet.config import RunConfig, apply_preset
from fedmergenet.launcher.federated import run_simulation
from fedmergenet.flower.client_app import local_train
from fedmergenet.data.splits import client_data
from fedmergenet.models import initial_student
from fedmergenet.results import read_metrics

from .measure import Settings, median

# Which process is which, by command line (flwr 1.42 with Ray).
# In the simulation runtime the ServerApp runs inside the `flwr-simulation` process.
ROLES = (("flwr-serverapp", "server"), ("flwr-simulation", "server"), ("ClientAppActor", "client_actor"),
         ("flower-superlink", "superlink"), ("raylet", "ray daemons"), ("gcs_server", "ray daemons"),
         ("ray::", "ray daemons"))


def _role(cmdline: str) -> str | None:
    for marker, role in ROLES:
        if marker in cmdline:
            return role
    return None


def _rss_bytes(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _used_memory() -> int:
    info = {}
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


@dataclass
class MemorySampler:
    """Peak resident memory per Flower process role, and of the whole machine, during a run."""

    interval: float = 0.5
    peaks: dict[str, int] = field(default_factory=dict)
    actors: set[str] = field(default_factory=set)
    baseline: int = 0
    peak_used: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> MemorySampler:
        self.baseline = self.peak_used = _used_memory()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_used = max(self.peak_used, _used_memory())
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                role = _role(cmdline)
                if role is None:
                    continue
                if role == "client_actor":
                    self.actors.add(pid)
                self.peaks[role] = max(self.peaks.get(role, 0), _rss_bytes(pid))

    def report(self) -> dict[str, Any]:
        return {"peak_rss_bytes": dict(self.peaks), "client_actors": len(self.actors),
                "machine_extra_bytes": self.peak_used - self.baseline}


def round_walls(rows: list[dict]) -> list[float]:
    """Seconds each round took, from the ServerApp's own clock in metrics.jsonl: from its train
    messages going out to the next round's, the last round to its evaluation."""
    starts = [r["round_start_s"] for r in rows[1:]] + [rows[-1]["wall_time_s"]]
    return [b - a for a, b in zip(starts, starts[1:])]


def overhead_config(settings: Settings) -> RunConfig:
    """The quick preset as users run it; the teacher's values do not change the costs measured."""
    cfg = apply_preset("quick").replace(random_teacher=True, skip_federated_eval=True, seed=0,
                                        output_dir=str(settings.work_dir / "overhead"))
    if settings.tiny:  # two rounds: the second fuses; no evaluate phase, which tiny runs do not time
        cfg = cfg.replace(train_limit=96, test_limit=64, rounds=2, num_clients=2, batch_size=16,
                          adapter_layers=settings.adapter_layers, recalibrate_bn=False)
    return cfg


def sequential_training(cfg: RunConfig, threads: int) -> float:
    """The reference for the runtime: every client's local training of every round, one after
    another in this process, with the threads each simulated client had."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        for server_round in range(1, cfg.rounds + 1):
            for partition in range(cfg.num_clients):
                local_train(cfg, initial_student(cfg), partition, cfg.num_clients, server_round, torch.device("cpu"))
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)


def server_and_runtime(settings: Settings) -> dict[str, Any]:
    """1b (server share of each round), 1c (runtime overhead), 1d (bytes per client per round)
    and 1e (peak memory) from one quick-preset simulation run. One Ray actor holding every
    core trains the clients one after another, as the in-process reference does."""
    cfg = overhead_config(settings).replace(client_threads=settings.threads)
    with MemorySampler() as memory:
        start = time.perf_counter()
        run_simulation(cfg, num_cpus_per_client=settings.threads, echo=False)
        flower_s = time.perf_counter() - start
    rows = read_metrics(Path(cfg.output_dir))
    walls = round_walls(rows)
    rounds = rows[1:]
    server_ms = [r["aggregate_ms"] + r["fusion_ms"] for r in rounds]
    reference_s = median([sequential_training(cfg, settings.threads) for _ in range(1 if settings.tiny else 2)])
    # Our server work in the rounds' path: aggregation and fusion, and the last round's test-set
    # evaluation; every other round's evaluation runs while the next phase's clients train.
    serial_ms = server_ms[:-1] + [server_ms[-1] + rows[-1]["server_eval_ms"]]
    app_work_s = sum(serial_ms) / 1000
    # Per round, once everything is started: the round's wall time without that server work,
    # against one round of the reference's training.
    steady = [w - ms / 1000 for w, ms in zip(walls, serial_ms)][1:] or [walls[-1]]
    images_per_round = cfg.local_epochs * sum(client_data(cfg, i, cfg.num_clients).num_train
                                              for i in range(cfg.num_clients))
    return {
        "images_per_round": images_per_round,
        "config": {"rounds": cfg.rounds, "clients": cfg.num_clients, "train_limit": cfg.train_limit,
                   "batch_size": cfg.batch_size, "threads": settings.threads},
        "rounds": [{"round": r["round"], "wall_s": w, "aggregate_ms": r["aggregate_ms"], "fusion_ms": r["fusion_ms"],
                    "fusion_applied": r["fusion_applied"], "learned": r["adapter_learned"],
                    "server_eval_ms": r["server_eval_ms"], "share": ms / (1000 * w)}
                   for r, w, ms in zip(rounds, walls, server_ms)],
        "server_share_max": max(ms / (1000 * w) for w, ms in zip(walls, server_ms)),
        "server_share_mean": sum(server_ms) / (1000 * sum(walls)),
        "flower_run_s": flower_s,
        "serverapp_s": rows[-1]["wall_time_s"],
        "startup_s": flower_s - rows[-1]["wall_time_s"] + rows[1]["round_start_s"],
        "reference_s": reference_s,
        "runtime_ratio": flower_s / reference_s,
        "runtime_ratio_without_app_work": (flower_s - app_work_s) / reference_s,
        "steady_round_ratio": median(steady) / (reference_s / cfg.rounds),
        "bytes_per_client_round": [(r["bytes_down"] + r["bytes_up"]) / max(1, r["sampled"]) for r in rounds],
        "memory": memory.report(),
    }


def scale_config(settings: Settings, per_round: int) -> RunConfig:
    """Fifty clients, a few dozen images each, three rounds (the second is the steady state:
    the first also starts the actors' ClientApps, the last also carries the evaluate phase that
    recomputes its BatchNorm statistics). Tiny settings: 4 clients, one round."""
    clients = 4 if settings.tiny else 50
    return RunConfig(dataset="fashion-mnist", train_limit=clients * 24, test_limit=64 if settings.tiny else 200,
                     num_clients=clients, clients_per_round=per_round, rounds=1 if settings.tiny else 3, local_epochs=1,
                     batch_size=16, lr=0.03, random_teacher=True, skip_federated_eval=True, device="cpu", seed=0,
                     adapter_layers=settings.adapter_layers, recalibrate_bn=not settings.tiny,
                     output_dir=str(settings.work_dir / f"scale-{per_round}"))


def scale(settings: Settings) -> list[dict[str, Any]]:
    """3: round time and memory for 5, 15 and 30 clients per round out of 50 (simulation,
    one CPU per client as the runner uses, so as many actors as cores)."""
    points = (2,) if settings.tiny else (5, 15, 30)
    results = []
    for per_round in points:
        cfg = scale_config(settings, per_round)
        with MemorySampler() as memory:
            start = time.perf_counter()
            run_simulation(cfg, num_cpus_per_client=1, echo=False)
            total = time.perf_counter() - start
        rows = read_metrics(Path(cfg.output_dir))
        walls = round_walls(rows)
        steady = min(2, cfg.rounds)  # round 2 of 3; a tiny run's only round
        results.append({"clients": cfg.num_clients, "per_round": per_round, "first_round_s": walls[0],
                        "round_s": walls[steady - 1], "replies": rows[steady]["replies"],
                        "fusion_ms": rows[steady]["fusion_ms"], "run_s": total, "memory": memory.report()})
    return results
