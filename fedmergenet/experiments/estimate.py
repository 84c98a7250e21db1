"""How long a suite will take, said before it starts: a few timed training steps on this
machine (through the training loop, so a GPU's recorded step is what is timed), scaled by the
work the suite's arms will do."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..fusion import KnowledgeFusionUnit
from ..models import STUDENT_LAYER, build_student, build_teacher
from ..training import make_optimizer, pick_device, train_epoch

# Fixed costs of a simulation run on the 2-core CPU machine these were measured on (quick
# suite, README): before its first round and after its last (SuperLink, `flwr run`, Ray, the
# app processes importing torch), and per round (messages, each client loading the model,
# the evaluate phase with BatchNorm recalibration, the resumable checkpoint).
SIMULATION_START_S = 35.0
FEDERATED_ROUND_S = 10.0
# The same per-round cost on a GPU: a `gpu` suite round's span beyond its slowest client's
# training, recalibration included, as measured on an H200 (README, Performance).
FEDERATED_ROUND_S_CUDA = 4.0
# Evaluation is a forward pass only: about this many times training's throughput.
EVAL_SPEEDUP = 3.0


@dataclass(frozen=True)
class Estimate:
    teacher_s: float
    per_seed_s: float
    seeds: int

    @property
    def arms_s(self) -> float:
        return self.per_seed_s * self.seeds

    def describe(self) -> str:
        teacher = f"teacher pretraining {duration(self.teacher_s)}, then " if self.teacher_s else ""
        return (f"estimated time: {teacher}{duration(self.arms_s)} for 6 arms x {self.seeds} seed(s) "
                f"(~{self.per_seed_s / 60:.1f} min per seed), from timing a few steps on this machine")


def duration(seconds: float) -> str:
    """Rounded to what an estimate can say: seconds under a minute (a GPU's teacher), else minutes."""
    return f"~{seconds:.0f} s" if seconds < 59.5 else f"~{seconds / 60:.0f} min"


def images_per_second(model: torch.nn.Module, batch_size: int, device: torch.device) -> float:
    """Training throughput of ``model`` through the training loop on random 32x32 batches. On
    CUDA the loop replays a recorded step (about ten times an eager step's rate for the
    student), so the rate is the difference between a short and a long epoch after an untimed
    one: what each further batch costs, without the per-epoch recording. On the CPU the loop is
    eager, and two steps after an untimed one tell its rate."""
    model = model.to(device).train()
    optimizer = make_optimizer(model, lr=0.0)
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    short, long = (4, 16) if device.type == "cuda" else (0, 2)

    def epoch_seconds(batches: int) -> float:
        if batches == 0:
            return 0.0
        start = time.perf_counter()
        train_epoch(model, [(images, labels)] * batches, optimizer, device, progress=False)  # reads the loss: synced
        return time.perf_counter() - start

    epoch_seconds(max(short, 1))  # CUDA and cuDNN set-up, first allocations
    seconds = epoch_seconds(long) - epoch_seconds(short)
    return (long - short) * batch_size / max(seconds, 1e-9)


FUSION_SAMPLES = 3


def fusion_seconds(num_classes: int, cfg: RunConfig) -> float:
    """One fuse + learn of the real layer shapes: the median of a few after an untimed one. A
    run fuses hundreds of times in one process, so the first call's set-up (the adapter's
    kernels loading, the optimiser's state) is not what each fusion costs."""
    shape = tuple(build_student(num_classes=num_classes).state_dict()[STUDENT_LAYER].shape)
    unit = KnowledgeFusionUnit(torch.randn(num_classes, 2048), shape, cfg.adapter(), device=cfg.server_device)
    layer = torch.randn(shape) * 0.05

    def once() -> float:
        start = time.perf_counter()
        unit.learn(unit.fuse(layer), layer)
        if unit.device.type == "cuda":
            torch.cuda.synchronize(unit.device)
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(FUSION_SAMPLES))


def estimate_suite(cfg: RunConfig, seeds: int, train_images: int, test_images: int, num_classes: int,
                   teacher_images: int = 0) -> Estimate:
    """Seconds for the six arms (and the teacher, when ``teacher_images`` > 0 must be trained)."""
    device = pick_device(cfg.device)
    with torch.random.fork_rng(devices=[]):
        student_rate = images_per_second(build_student(num_classes=num_classes), cfg.batch_size, device)
        fusion_s = fusion_seconds(num_classes, cfg)
        teacher_rate = (images_per_second(build_teacher(num_classes=num_classes), cfg.batch_size, device)
                        if teacher_images else 0.0)
    epochs = cfg.total_epochs
    train_s = epochs * train_images / student_rate
    eval_s = (epochs + 1) * test_images / (EVAL_SPEEDUP * student_rate)
    central_fusions = epochs * -(-train_images // cfg.batch_size) // cfg.fusion_batches
    federated_fusions = max(0, cfg.rounds - cfg.fusion_start_round + 1)
    # Federated arms also evaluate each client's validation split every round.
    federated_eval_s = eval_s + epochs * cfg.val_fraction * train_images / (EVAL_SPEEDUP * student_rate)
    central = train_s + eval_s
    round_s = FEDERATED_ROUND_S_CUDA if device.type == "cuda" else FEDERATED_ROUND_S
    federated = train_s + federated_eval_s + cfg.rounds * round_s
    # The three federated arms share one Flower run, so one simulation start-up.
    per_seed = (central + 2 * (central + central_fusions * fusion_s)
                + SIMULATION_START_S + federated + 2 * (federated + federated_fusions * fusion_s))
    teacher_s = cfg.teacher_epochs * teacher_images / teacher_rate if teacher_images else 0.0
    return Estimate(teacher_s=teacher_s, per_seed_s=per_seed, seeds=seeds)
