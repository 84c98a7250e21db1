"""The frozen ResNet50 teacher: checkpoint format, loading with checks, and a random stand-in.

A checkpoint is a plain dict (loadable with ``weights_only=True``): ``state_dict`` plus what
it was trained on (dataset, classes, epochs, accuracy), so a mismatch is caught at start-up
rather than after hours of training.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import save_torch
from .errors import CheckpointError
from .models import TEACHER_LAYER, ResNet50, build_teacher, state_checksum

# The preset whose teacher recipe fits each dataset's default checkpoint (config/<preset>.toml).
TEACHER_PRESETS = {"fashion-mnist": "quick", "cifar100": "paper"}


def pretrain_hint(path: Path, dataset: str) -> str:
    """The command that makes the missing teacher, from the project folder."""
    return (f"make one with: python run_federated_mergenet.py --pretrain-teacher --preset "
            f"{teacher_preset(path, dataset)} --teacher-checkpoint {path}")


def teacher_preset(path: Path, dataset: str) -> str:
    """The preset whose teacher recipe makes this checkpoint: the one that names its file, else the dataset's."""
    from .config import preset_names, read_preset

    for name in preset_names():
        named = read_preset(name).get("teacher_checkpoint")
        if named and Path(named).name == path.name:
            return name
    return TEACHER_PRESETS.get(dataset, "paper")


@dataclass(frozen=True)
class TeacherInfo:
    source: str  # "checkpoint" or "random"
    path: str
    dataset: str
    num_classes: int
    epochs: int
    test_top1: float | None
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def save_teacher(model: ResNet50, path: Path, *, dataset: str, epochs: int, test_top1: float, extra: dict | None = None) -> None:
    payload = {
        "state_dict": model.state_dict(),
        "architecture": "resnet50-cifar",
        "dataset": dataset,
        "num_classes": int(model.fc.out_features),
        "in_channels": int(model.conv1[0].in_channels),
        "epochs": int(epochs),
        "test_top1": float(test_top1),
        **(extra or {}),
    }
    save_torch(Path(path), payload)


def load_teacher(path: Path, *, dataset: str, num_classes: int, in_channels: int = 3) -> tuple[ResNet50, TeacherInfo]:
    """Load and check a teacher checkpoint; every problem is a one-line CheckpointError."""
    path = Path(path)
    hint = pretrain_hint(path, dataset)
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint {path} not found; {hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: say which, not how pickle failed
        raise CheckpointError(f"teacher checkpoint {path} is unreadable ({type(exc).__name__}); {hint}") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"teacher checkpoint {path} has no state_dict; {hint}")
    if payload.get("dataset", dataset) != dataset:
        raise CheckpointError(f"teacher checkpoint {path} was trained on {payload['dataset']}, not {dataset}; {hint}")
    state = payload["state_dict"]
    fc = state.get(TEACHER_LAYER)
    if fc is None or tuple(fc.shape) != (num_classes, 2048):
        shape = None if fc is None else tuple(fc.shape)
        raise CheckpointError(
            f"teacher checkpoint {path} has {TEACHER_LAYER} of shape {shape}, expected ({num_classes}, 2048) "
            f"for {dataset}; {hint}"
        )
    model = build_teacher(num_classes=num_classes, in_channels=in_channels)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"teacher checkpoint {path} does not fit a CIFAR ResNet50 ({first}); {hint}") from exc
    freeze(model)
    info = TeacherInfo(
        source="checkpoint",
        path=str(path.resolve()),
        dataset=dataset,
        num_classes=num_classes,
        epochs=int(payload.get("epochs", 0)),
        test_top1=payload.get("test_top1"),
        sha256=state_checksum(model.state_dict()),
    )
    return model, info


def random_teacher(*, dataset: str, num_classes: int, in_channels: int = 3, seed: int = 0) -> tuple[ResNet50, TeacherInfo]:
    """An untrained teacher, for smoke tests only: fusion then transfers no knowledge."""
    warnings.warn("--random-teacher: the teacher is untrained, so fusion transfers no knowledge (recorded in the results)",
                  stacklevel=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_teacher(num_classes=num_classes, in_channels=in_channels)
    freeze(model)
    info = TeacherInfo("random", "", dataset, num_classes, 0, None, state_checksum(model.state_dict()))
    return model, info


def placebo_teacher(model: ResNet50, info: TeacherInfo, seed: int = 0) -> tuple[ResNet50, TeacherInfo]:
    """The control for fusion: the teacher with the entries of its fused matrix (``fc.weight``)
    shuffled by ``seed``. Same shape, same values and scale, no class structure: what fusion
    gains from it is perturbation, not knowledge."""
    state = model.state_dict()
    matrix = state[TEACHER_LAYER]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(matrix.numel(), generator=generator)
    shuffled = build_teacher(num_classes=info.num_classes, in_channels=int(model.conv1[0].in_channels))
    shuffled.load_state_dict({**state, TEACHER_LAYER: matrix.reshape(-1)[order].reshape(matrix.shape)})
    freeze(shuffled)
    placebo = TeacherInfo("placebo", info.path, info.dataset, info.num_classes, info.epochs, info.test_top1,
                          state_checksum(shuffled.state_dict()))
    return shuffled, placebo


def teacher_for_run(*, path: Path, dataset: str, num_classes: int, random: bool, placebo: bool,
                    seed: int, wait: bool = False) -> tuple[ResNet50, TeacherInfo]:
    """The teacher a run fuses from: the checkpoint, its placebo, or an untrained stand-in.
    ``wait``: a missing checkpoint is being pretrained by another process (--await-teacher)."""
    if random:
        model, info = random_teacher(dataset=dataset, num_classes=num_classes, seed=seed)
    else:
        if wait:
            wait_for_teacher(path)
        model, info = load_teacher(path, dataset=dataset, num_classes=num_classes)
    return placebo_teacher(model, info, seed) if placebo else (model, info)


def wait_for_teacher(path: Path, poll_s: float = 0.5) -> None:
    """Until the checkpoint at ``path`` exists; save_teacher writes it whole or not at all.

    No time limit of its own: the suite that pretrains the teacher stops its arms if the
    pretraining fails, and an arm whose suite is killed outright is sent SIGTERM with it
    (processes.Processes.start)."""
    if path.is_file():
        return
    print(f"waiting for the teacher checkpoint {path}, which another process is pretraining", flush=True)
    while not path.is_file():
        time.sleep(poll_s)


def freeze(model: torch.nn.Module) -> None:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
