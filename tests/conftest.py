"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmergenet.models import build_student, build_teacher
from fedmergenet.teacher import save_teacher


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine two threads spin-wait on each other (3-10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher checkpoint in the real format (untrained weights: end-to-end tests check plumbing)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    save_teacher(build_teacher(num_classes=10), path, dataset="fashion-mnist", epochs=0, test_top1=0.1)
    return path


@pytest.fixture(scope="module")
def task_identity():
    """Messages built outside a running app need a run/node/task identity (Flower 1.42)."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    """The real student's state_dict: 373 named tensors, BatchNorm buffers included."""
    torch.manual_seed(0)
    return build_student(num_classes=10).state_dict()
