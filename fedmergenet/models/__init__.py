"""Student and teacher models, and the names of the tensors MergeNet connects."""

from __future__ import annotations

import torch

from ..config import RunConfig
from .mobilenetv2 import MobileNetV2
from .resnet import ResNet50

# The student layer the adapter rewrites and the teacher matrix it attends to.
STUDENT_LAYER = "stage6.2.residual.6.weight"
TEACHER_LAYER = "fc.weight"


def build_student(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels)


def build_teacher(num_classes: int = 100, in_channels: int = 3) -> ResNet50:
    return ResNet50(num_classes=num_classes, in_channels=in_channels)


def new_student(cfg: RunConfig, device: torch.device | None = None) -> MobileNetV2:
    """A student whose weights are about to be overwritten (clients load the global model). On
    ``device`` its tensors are allocated there and left uninitialised: no initialisation to
    throw away, and no copy of its 373 tensors to the card one by one."""
    from ..data.splits import train_set

    num_classes = train_set(cfg).num_classes
    if device is None:
        return build_student(num_classes=num_classes)
    with torch.device("meta"):
        student = build_student(num_classes=num_classes)
    return student.to_empty(device=device)


def initial_student(cfg: RunConfig) -> MobileNetV2:
    """The starting weights, a function of the seed alone: every arm of a comparison starts equal."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return new_student(cfg)


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """A SHA-256 over every tensor by name: equal checksums mean equal models."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


__all__ = ["MobileNetV2", "ResNet50", "STUDENT_LAYER", "TEACHER_LAYER", "build_student", "build_teacher",
           "initial_student", "new_student", "state_checksum"]
