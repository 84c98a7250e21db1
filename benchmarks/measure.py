"""In-process measurements, each a ratio against a plain reference timed in the same process:
client training throughput, forward-only passes, the adapter's fusion step, the wire size of
the student, and the server's checkpoint write."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedmergenet.config import AdapterConfig, RunConfig
from fedmergenet.flower.client_app import local_train
from fedmergenet.data.splits import client_data, test_loader
from fedmergenet.models import initial_student
from fedmergenet.models import STUDENT_LAYER
from fedmergenet.training import evaluate, make_optimizer, recalibrate_bn


@dataclass(frozen=True)
class Settings:
    """How hard to measure: ``tiny`` only proves every benchmark runs (the test suite)."""

    tiny: bool
    repeats: int  # timed repeats, after one untimed warm-up
    threads: int  # torch threads for the in-process measurements
    work_dir: Path

    @property
    def adapter_layers(self) -> int:
        """Tiny settings run one adapter layer: they prove each figure runs, at half the cost."""
        return 1 if self.tiny else RunConfig.adapter_layers


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # GPU work is asynchronous: time it to its end
    return time.perf_counter() - start


def interleaved(samples: int, *measures: Callable[[], Any]) -> list[list[Any]]:
    """Each measure's results over ``samples`` rounds, taking one of each per round, so drift
    in the machine's clocks weighs on all alike."""
    results: list[list[Any]] = [[] for _ in measures]
    for _ in range(samples):
        for result, measure in zip(results, measures):
            result.append(measure())
    return results


def throughput_config(settings: Settings) -> RunConfig:
    """The quick preset's client: Fashion-MNIST, batch 32, one local epoch on one partition."""
    return RunConfig(dataset="fashion-mnist", train_limit=64 if settings.tiny else 600, test_limit=32,
                     num_clients=1, batch_size=32, lr=0.03, local_epochs=1, device="cpu")


def plain_epoch(model: nn.Module, loader, lr: float, channels_last: bool = False,
                device: torch.device = torch.device("cpu")) -> int:
    """The reference: model, SGD, the same batches, nothing else."""
    optimizer = make_optimizer(model, lr)
    criterion = nn.CrossEntropyLoss()
    model.train()
    seen = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad()
        criterion(model(images), labels).backward()
        optimizer.step()
        seen += len(labels)
    return seen


def client_throughput(settings: Settings, device: torch.device = torch.device("cpu"),
                      cfg: RunConfig | None = None, compiled: bool = False) -> dict[str, Any]:
    """1a: the ClientApp's local training (our loop, loader, schedule) against the plain loop,
    on the same device, threads and batches (same partition and round seed). Ours runs with
    its fast path (channels_last; on CUDA also the recorded step) and without it (the layout
    the plain loop uses, eager); on CUDA also in channels_last but eager, and with ``compiled``
    also with ``--compile``. cuDNN's benchmark mode is not a variant here: cuDNN keeps the
    algorithm it chose for a convolution per process, keyed without that mode, so after the other
    variants' epochs it would only reuse their choices."""
    cfg = cfg or throughput_config(settings)
    start_state = initial_student(cfg).state_dict()
    images = client_data(cfg, 0, cfg.num_clients).num_train

    def fresh(channels_last: bool = False) -> nn.Module:
        model = initial_student(cfg)
        model.load_state_dict(start_state)
        model.to(device)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    def ours(round_seed: int, memory_format: torch.memory_format | None = None, capture: bool | None = None,
             compile_step: bool = False) -> float:
        model = fresh()
        return timed(lambda: local_train(cfg.replace(compile=compile_step), model, 0, cfg.num_clients, round_seed,
                                         device, memory_format=memory_format, capture=capture))

    def plain(round_seed: int, channels_last: bool = False) -> float:
        loader = client_data(cfg, 0, cfg.num_clients, round_seed=round_seed, device=device).train
        model = fresh(channels_last)
        return timed(lambda: plain_epoch(model, loader, cfg.lr, channels_last, device))

    variants = {
        "ours": lambda seed: ours(seed),
        "ours_without_fast_path": lambda seed: ours(seed, torch.contiguous_format, capture=False),
        "plain": lambda seed: plain(seed),
        "plain_channels_last": lambda seed: plain(seed, channels_last=True),
    }
    if device.type == "cuda":
        variants["ours_eager"] = lambda seed: ours(seed, capture=False)
        if compiled:
            variants["ours_compiled"] = lambda seed: ours(seed, compile_step=True)
    # Warm-up: first-call allocations and kernel selection, and torch.compile's compilation.
    first_s = {name: measure_once(1) for name, measure_once in variants.items()}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(settings.repeats):
        # Rotate the order so drift in machine load does not favour one variant.
        names = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
        for name in names:
            seconds[name].append(variants[name](r + 2))
    per_s = {name: images / median(values) for name, values in seconds.items()}
    return {
        "device": str(device),
        "images_per_epoch": images,
        "batch_size": cfg.batch_size,
        "images_per_s": per_s,
        "ratio": per_s["ours"] / per_s["plain"],
        "ratio_without_fast_path": per_s["ours_without_fast_path"] / per_s["plain"],
        "ratio_same_layout": per_s["ours"] / per_s["plain_channels_last"],
        "first_epoch_s": first_s,
    }


def forward_passes(settings: Settings) -> dict[str, Any]:
    """1a: the forward-only passes, evaluation (the quick preset's test set, its evaluation
    batch) and a client's BatchNorm recalibration (one partition), in the layout the device's
    ``forward_memory_format`` picks against the default layout: same model, batches and threads."""
    cfg = throughput_config(settings).replace(test_limit=64 if settings.tiny else 300)
    cpu = torch.device("cpu")
    model = initial_student(cfg)
    train, tests = client_data(cfg, 0, cfg.num_clients).train, test_loader(cfg, cpu)
    passes = {
        "evaluate": lambda memory_format: evaluate(model, tests, cpu, memory_format=memory_format),
        "recalibrate": lambda memory_format: recalibrate_bn(model, train, cpu, memory_format=memory_format),
    }
    figures: dict[str, Any] = {}
    for name, run in passes.items():
        ours, default = (lambda: timed(lambda: run(None))), (lambda: timed(lambda: run(torch.contiguous_format)))
        ours(), default()  # warm-up
        ours_s, default_s = interleaved(settings.repeats, ours, default)
        images = len(tests.dataset) if name == "evaluate" else len(train.dataset)
        batch_size = cfg.eval_batch_size if name == "evaluate" else cfg.batch_size
        figures[name] = {"images": images, "batch_size": batch_size, "ours_images_per_s": images / median(ours_s),
                         "default_layout_images_per_s": images / median(default_s),
                         "ratio": median(default_s) / median(ours_s)}
    return figures


def fusion_step(settings: Settings, num_classes: int = 10, device: str = "cpu") -> dict[str, Any]:
    """1b: one server fusion step (fuse, then learn from the observed layer) against the
    adapter's bare forward + backward on the same inputs."""
    from fedmergenet.fusion import KnowledgeFusionUnit

    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(num_classes, 2048, generator=generator) * 0.02
    layer = torch.randn(160, 960, 1, 1, generator=generator) * 0.05
    observed = layer + 0.01 * torch.randn(layer.shape, generator=generator)
    unit = KnowledgeFusionUnit(teacher, tuple(layer.shape), AdapterConfig(), total_updates=100, device=device, seed=0)
    adapter, student, teacher_m = unit.adapter, layer.reshape(160, 960).to(unit.device), unit.teacher
    params = [p for p in adapter.parameters() if p.requires_grad]

    def ours() -> tuple[float, float]:
        holder: dict[str, torch.Tensor | None] = {}
        fuse_s = timed(lambda: holder.setdefault("fused", unit.fuse(layer)))
        return fuse_s, timed(lambda: unit.learn(holder["fused"], observed))

    def bare() -> tuple[float, float]:
        holder: dict[str, torch.Tensor] = {}
        forward_s = timed(lambda: holder.setdefault("out", adapter(student, teacher_m)))
        out = holder["out"]
        backward_s = timed(lambda: torch.autograd.grad([out], params, grad_outputs=[torch.ones_like(out)]))
        return forward_s, backward_s

    ours(), bare()
    # On a GPU a step takes milliseconds, and three of them are noise: ten times as many there.
    ours_runs, bare_runs = interleaved(settings.repeats * (10 if unit.device.type == "cuda" else 1), ours, bare)
    ours_total = median([a + b for a, b in ours_runs])
    bare_total = median([a + b for a, b in bare_runs])
    return {
        "fuse_ms": 1000 * median([a for a, _ in ours_runs]),
        "learn_ms": 1000 * median([b for _, b in ours_runs]),
        "bare_forward_ms": 1000 * median([a for a, _ in bare_runs]),
        "bare_backward_ms": 1000 * median([b for _, b in bare_runs]),
        "step_ms": 1000 * ours_total,
        "ratio": ours_total / bare_total,
        "adapter_parameters": unit.num_parameters,
        "device": str(unit.device),
        "samples": len(ours_runs),
    }


def wire_bytes(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """1d: what an ArrayRecord of the student really puts on the wire (Flower's deflated
    objects) against the raw float32 size of its state."""
    from flwr.app import ArrayRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = get_all_nested_objects(ArrayRecord(state))
    wire = sum(len(obj.deflate()) for obj in objects.values())
    raw = sum(t.numel() * 4 for t in state.values())
    return {"wire_bytes": wire, "raw_float32_bytes": raw, "ratio": wire / raw, "objects": len(objects)}


def trained_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fresh student has many identical tensors (zero biases, unit variances) that Flower
    sends once; after training they all differ. Perturb every float tensor to measure that."""
    generator = torch.Generator().manual_seed(1)
    return {k: v + 1e-3 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def student_wire(cfg: RunConfig, repeats: int = 5) -> dict[str, Any]:
    state = initial_student(cfg).state_dict()
    trained = trained_like(state)
    return {"initial": wire_bytes(state), "trained": wire_bytes(trained),
            "conversions": array_conversions(trained, repeats)}


def array_conversions(state: dict[str, torch.Tensor], repeats: int) -> dict[str, dict[str, float]]:
    """1d: what reading, writing and loading a message's tensors costs with ``flower.arrays``
    against Flower's own ``Array.numpy()``, ``Array(ndarray)`` and ``to_torch_state_dict()`` on
    the same record, interleaved: milliseconds per message (all of the student's tensors)."""
    from flwr.app import Array, ArrayRecord

    from fedmergenet.flower.arrays import as_array, tensors_of, values

    record = ArrayRecord(state)
    arrays = [array.numpy() for array in record.values()]
    pairs = {
        "read": (lambda: [array.numpy() for array in record.values()], lambda: [values(a) for a in record.values()]),
        "write": (lambda: [Array(array) for array in arrays], lambda: [as_array(array) for array in arrays]),
        "load": (record.to_torch_state_dict, lambda: tensors_of(record)),
    }
    figures = {}
    for name, (flowers, ours) in pairs.items():
        flower_s, ours_s = interleaved(max(3, repeats), lambda: timed(flowers), lambda: timed(ours))
        figures[name] = {"flower_ms": 1000 * median(flower_s), "ours_ms": 1000 * median(ours_s),
                         "speedup": median(flower_s) / median(ours_s)}
    return figures


def checkpoint_write(settings: Settings, num_classes: int = 10) -> dict[str, Any]:
    """The server's per-round resumable state (global model, adapter with AdamW moments)."""
    from fedmergenet.flower.state import ServerState, StateWriter, save_state
    from fedmergenet.fusion import KnowledgeFusionUnit

    teacher = torch.randn(num_classes, 2048) * 0.02
    student = initial_student(RunConfig(dataset="fashion-mnist")).state_dict()
    layer = student[STUDENT_LAYER]
    adapter = AdapterConfig(num_layers=settings.adapter_layers)
    unit = KnowledgeFusionUnit(teacher, tuple(layer.shape), adapter, total_updates=10, device="cpu", seed=0)
    fused = unit.fuse(layer)
    unit.learn(fused, layer)  # the optimizer's moments now exist, as in every later round
    state = ServerState(round=1, arrays=student, fusion=unit.state_dict(), pending_fused=None, best_top1=0.0,
                        elapsed_s=0.0)
    with tempfile.TemporaryDirectory(dir=settings.work_dir) as folder:
        out = Path(folder)
        save_state(out, state)
        seconds = [timed(lambda: save_state(out, state)) for _ in range(max(1, settings.repeats))]
        size = (out / "server_state.pt").stat().st_size
        # What the round loop waits for: the copy; the write itself lands while the next round trains.
        writer = StateWriter(out)
        blocking = []
        for _ in range(max(1, settings.repeats)):
            writer.wait()
            blocking.append(timed(lambda: writer.save(state)))
        writer.wait()
    return {"bytes": size, "write_ms": 1000 * median(seconds), "blocking_ms": 1000 * median(blocking)}
