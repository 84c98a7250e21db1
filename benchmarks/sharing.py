"""4e: how several trainings share one GPU (``python -m benchmarks --cuda``, or alone:
``python -m benchmarks.sharing [--models 3] [--steps 200] > sharing.json``, which names its
machine, and ``python -m benchmarks --add-sharing sharing.json`` puts it into BENCHMARKS.md).

The suite runs its arms side by side as processes (``--jobs``), and each federated client is a
Ray actor, a process of its own. A card without MPS runs one process's kernels at a time, so
processes side by side may add no images per second to what one process alone gets. Measured
here: the student's recorded training step at batch 128 (random data already on the card, no
augmentation: what is shared is the step), the same number of steps per model

- alone in one process (the reference),
- in ``models`` processes at once (started together behind a barrier),
- the same under CUDA MPS, which runs several processes' kernels at once: a control daemon of
  the benchmark's own (its pipe folder private, so no other process joins it), stopped after;
  left out where the machine has no ``nvidia-cuda-mps-control`` or it does not start; then
  twice as many processes under MPS,
- as ``models`` students in one process, all on one stream,

as aggregate images per second and as ratios to the reference. Students in one process on CUDA
streams of their own are not measured: on an H200 their recorded steps replayed at once hung
when recorded on torch's one capture stream, and trained differently from the same replays in
turn when recorded on their own streams. The measurement in one process runs in a process of
its own with a time limit, so that a replay stuck in the driver is reported as such. A time
limit's SIGTERM still writes the figures measured before it, marked ``stopped``.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import multiprocessing as mp
import queue
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from fedmergenet.launcher.processes import MPS_CONTROL, environment_with, private_mps
from fedmergenet.models import build_student
from fedmergenet.training import CAPTURE_WARMUP_STEPS, make_optimizer
from fedmergenet.training import _CapturedStep, _on_side_stream, _Step  # the loop's own step, recorded as it records it

BATCH_SIZE = 128


def recorded_steps(models: int, batch_size: int, seed: int = 0) -> list[_CapturedStep]:
    """``models`` students on the card, each with its step recorded after the loop's warm-up."""
    torch.manual_seed(seed)
    device = torch.device("cuda")
    steps = []
    for _ in range(models):
        model = build_student(num_classes=10).to(device, memory_format=torch.channels_last).train()
        step = _Step(model, make_optimizer(model, lr=0.01), proximal=None)
        images = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (batch_size,), device=device)
        for _ in range(CAPTURE_WARMUP_STEPS):
            _on_side_stream(step, images, labels)
        steps.append(_CapturedStep(step, images, labels))
    torch.cuda.synchronize()
    return steps


def replay(steps: list[_CapturedStep], count: int) -> float:
    """Seconds for ``count`` replays of every step, in turn, until the card is done."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        for step in steps:
            step(*step.inputs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def ready(models: int, count: int, batch_size: int) -> list[_CapturedStep]:
    """``models`` recorded steps, replayed untimed a tenth of ``count`` times: the first replays
    allocate. Each model's first replay is waited for and logged, so that a replay that never
    returns is found in the log."""
    steps = recorded_steps(models, batch_size)
    for index, step in enumerate(steps):
        replay([step], 1)
        print(f"  model {index}: first replay done", file=sys.stderr, flush=True)
    replay(steps, max(3, count // 10))
    return steps


def in_one_process(models: int, count: int, batch_size: int = BATCH_SIZE) -> float:
    """Aggregate images/s of ``models`` students in this process (one: the reference)."""
    steps = ready(models, count, batch_size)
    return models * count * batch_size / replay(steps, count)


def _gathered(results: Any, children: list[Any], deadline: float) -> list[Any] | None:
    """One result from each of ``children`` (a result queue's), asked for every second; None
    once one of them has failed (exit code not 0) or ``deadline`` (time.monotonic()) has passed."""
    done: list[Any] = []
    while len(done) < len(children):
        try:
            done.append(results.get(timeout=1.0))
        except queue.Empty:
            if any(child.exitcode not in (None, 0) for child in children) or time.monotonic() > deadline:
                return None
    return done


def _one_process_child(models: int, count: int, batch_size: int, results: Any) -> None:
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    results.put(in_one_process(models, count, batch_size))


def in_a_child(models: int, count: int, batch_size: int = BATCH_SIZE, timeout: float = 120.0) -> float:
    """``in_one_process`` in a process of its own, which is killed after ``timeout`` seconds
    (a RuntimeError then): a replay stuck in the driver cannot be interrupted from Python."""
    context = mp.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_one_process_child, args=(models, count, batch_size, results))
    child.start()
    try:
        done = _gathered(results, [child], time.monotonic() + timeout)
        if done is None:
            raise RuntimeError(f"it failed or ran past {timeout:.0f} s (exit code {child.exitcode})")
        return done[0]
    finally:
        child.join(timeout=KILLED_JOIN_S)
        if child.is_alive():
            child.kill()
            child.join(timeout=KILLED_JOIN_S)


def _process(index: int, count: int, batch_size: int, barrier: Any, results: Any) -> None:
    # A time limit's SIGTERM reaches these processes too (``timeout`` signals its process group):
    # each writes where it was into the shared log before it ends.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    steps = ready(1, count, batch_size)
    print(f"process {index}: recorded, at the barrier", file=sys.stderr, flush=True)
    barrier.wait(timeout=300)  # every process set up: the timed replays overlap
    start = time.monotonic()  # system-wide, comparable across processes
    replay(steps, count)
    results.put((start, time.monotonic(), count * batch_size))


JOIN_S, KILLED_JOIN_S = 30.0, 5.0  # how long the processes get to end, after their work or after a kill


def in_processes(processes: int, count: int, batch_size: int = BATCH_SIZE, timeout: float = 600.0,
                 env: dict[str, str] | None = None) -> float:
    """Aggregate images/s of ``processes`` processes training one student each, at the same time
    (with ``env`` added to their environment)."""
    context = mp.get_context("spawn")  # CUDA cannot be forked
    barrier, results = context.Barrier(processes), context.Queue()
    children = [context.Process(target=_process, args=(index, count, batch_size, barrier, results))
                for index in range(processes)]
    with environment_with(env or {}):
        for child in children:
            child.start()
    join_s = JOIN_S
    try:
        done = _gathered(results, children, time.monotonic() + timeout)
        if done is None:
            raise RuntimeError(f"a process failed or ran past {timeout:.0f} s "
                               f"(exit codes {[child.exitcode for child in children]})")
    except BaseException:
        for child in children:  # the others would wait at the barrier
            child.kill()
        join_s = KILLED_JOIN_S
        raise
    finally:
        # One deadline for all: a killed process inside the driver (an MPS client) can take long
        # to go, and waiting for each in turn would outlast the time limit that stopped the run.
        joined_by = time.monotonic() + join_s
        for child in children:
            child.join(timeout=max(0.0, joined_by - time.monotonic()))
            if child.is_alive():
                child.kill()
    start, end = min(d[0] for d in done), max(d[1] for d in done)
    return sum(d[2] for d in done) / (end - start)


# MPS clients that cannot reach their server may hang instead of failing. They get this long
# (a start-up and 200 steps need far less), so that a hang still leaves the figures measured
# before them inside gpu_checks.sh's time limit for this step.
MPS_TIMEOUT_S = 90.0
# Several students in one process: a start-up, three recordings and 220 replays each need far less.
ONE_PROCESS_TIMEOUT_S = 75.0


def _reported(name: str, measurement: Callable[[], float]) -> float:
    """``measurement``'s images per second, its start and its figure written to stderr at once: a
    time limit that ends the benchmark before its JSON still leaves in the log what it measured,
    and which measurement it was in."""
    print(f"{name}: measuring", file=sys.stderr, flush=True)
    images_per_s = measurement()
    print(f"{name}: {images_per_s:,.0f} images/s", file=sys.stderr, flush=True)
    return images_per_s


def measure(models: int = 3, count: int = 200, batch_size: int = BATCH_SIZE,
            figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures, added to ``figures`` as each is measured (so that a caller stopped part way
    still holds those before); ``mps`` says what became of the MPS measurement (``measured``,
    or why not)."""
    figures = {} if figures is None else figures
    ips: dict[str, float] = {}
    ratios: dict[str, float] = {}
    failed: dict[str, str] = {}
    figures |= {"models": models, "steps": count, "batch_size": batch_size, "images_per_s": ips,
                "vs_one_process": ratios, "mps": "not reached before the run was stopped", "failed": failed}

    def add(name: str, measurement: Callable[[], float]) -> None:
        ips[name] = _reported(name, measurement)
        if name != "one_process":
            ratios[name] = ips[name] / ips["one_process"]

    def add_unless_failed(name: str, measurement: Callable[[], float]) -> None:
        try:
            add(name, measurement)
        except RuntimeError as exc:
            failed[name] = str(exc)
            print(f"{name}: {exc}", file=sys.stderr, flush=True)

    add("one_process", lambda: in_one_process(1, count, batch_size))
    add("processes", lambda: in_processes(models, count, batch_size))
    with private_mps() as env:
        if env is None:
            figures["mps"] = f"no {MPS_CONTROL} on the PATH" if shutil.which(MPS_CONTROL) is None else "its daemon did not start"
        else:
            try:
                add("processes_mps", lambda: in_processes(models, count, batch_size, timeout=MPS_TIMEOUT_S, env=env))
                figures["mps"] = "measured"
            except RuntimeError as exc:  # the daemon started, its clients could not use it
                figures["mps"] = f"its processes failed: {exc}"
                print(f"processes_mps: {figures['mps']}", file=sys.stderr, flush=True)
        if figures["mps"] == "measured":  # twice as many: whether a suite gains from more jobs side by side under MPS
            add_unless_failed("processes_mps_x2", lambda: in_processes(
                2 * models, count, batch_size, timeout=MPS_TIMEOUT_S, env=env))
    add_unless_failed("one_stream", lambda: in_a_child(models, count, batch_size, ONE_PROCESS_TIMEOUT_S))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sharing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=3, help="processes side by side, and students in one process")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per model")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU, and torch sees none here", file=sys.stderr)
        return 2
    if args.models < 1 or args.steps < 1:
        print("error: --models and --steps must be at least 1", file=sys.stderr)
        return 2
    # A time limit's SIGTERM ends the run through its finally blocks, which stop the MPS daemon.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # It first writes every thread's stack to stderr, at once: Python acts on the signal only
    # between bytecodes, so a run stuck in a CUDA call would otherwise end without saying where.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    from .__main__ import machine

    figures = {"date": datetime.date.today().isoformat(), "machine": machine(),
               "command": shlex.join(["python", "-m", "benchmarks.sharing", *(argv if argv is not None else sys.argv[1:])])}
    try:
        measure(args.models, args.steps, figures=figures)
    except SystemExit:
        figures["stopped"] = "by a SIGTERM (a time limit) before every figure was measured"
        print(json.dumps(figures, indent=1), flush=True)
        raise
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
