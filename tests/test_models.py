"""The student and teacher, by example: the tensors MergeNet connects have MergeNet's shapes."""

from __future__ import annotations

import pytest
import torch

from fedmergenet.models import STUDENT_LAYER, TEACHER_LAYER, build_student, build_teacher, state_checksum


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher10():
    """One 10-class ResNet50 (23.5M parameters) shared by the tests that only read it."""
    torch.manual_seed(0)
    return build_teacher(num_classes=10)


def test_student_layer_has_mergenets_shape():
    """The layer the adapter rewrites is the 1x1 projection [160, 960, 1, 1], whatever the class count."""
    for classes in (100, 10):
        assert tuple(build_student(num_classes=classes).state_dict()[STUDENT_LAYER].shape) == (160, 960, 1, 1)


def test_teacher_fc_weight_is_classes_by_2048(teacher10):
    """The teacher matrix the student attends to is fc.weight: [classes, 2048]."""
    assert tuple(build_teacher().state_dict()[TEACHER_LAYER].shape) == (100, 2048)
    assert tuple(teacher10.state_dict()[TEACHER_LAYER].shape) == (10, 2048)


def test_in_channels_sets_the_first_convolution():
    """Grey-scale inputs (in_channels=1) change only the stems, not the fused tensors."""
    student = build_student(num_classes=10, in_channels=1)
    teacher = build_teacher(num_classes=10, in_channels=1)
    assert tuple(student.pre[0].weight.shape) == (32, 1, 1, 1)
    assert tuple(teacher.conv1[0].weight.shape) == (64, 1, 3, 3)
    assert tuple(student.state_dict()[STUDENT_LAYER].shape) == (160, 960, 1, 1)
    assert tuple(teacher.state_dict()[TEACHER_LAYER].shape) == (10, 2048)
    with torch.no_grad():
        assert student.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_forward_on_a_32x32_batch_gives_one_logit_per_class(teacher10):
    """Both models map a CIFAR-sized batch [B, 3, 32, 32] to logits [B, classes]."""
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert build_student(num_classes=10).eval()(images).shape == (2, 10)
        assert build_student(num_classes=100).eval()(images).shape == (2, 100)
        assert teacher10.eval()(images).shape == (2, 10)


def test_state_checksum_tells_equal_models_from_changed_ones():
    """Equal weights give equal checksums; changing one value (or one buffer) changes it."""
    torch.manual_seed(1)
    a = build_student(num_classes=10)
    torch.manual_seed(1)
    b = build_student(num_classes=10)
    assert state_checksum(a.state_dict()) == state_checksum(b.state_dict())

    with torch.no_grad():
        b.state_dict()[STUDENT_LAYER][0, 0, 0, 0] += 1e-3
    assert state_checksum(a.state_dict()) != state_checksum(b.state_dict())

    c = build_student(num_classes=10)
    c.load_state_dict(a.state_dict())
    assert state_checksum(c.state_dict()) == state_checksum(a.state_dict())
    c.state_dict()["pre.1.running_mean"].add_(1.0)
    assert state_checksum(c.state_dict()) != state_checksum(a.state_dict())


def test_a_state_moves_by_name_in_one_copy_per_dtype():
    """``moved`` keeps every name, shape and dtype (BatchNorm's 0-d int64 counters included), in
    the state's order; a state already on the device comes back as it is."""
    from fedmergenet.training import moved

    state = build_student(num_classes=10).state_dict()
    assert moved(state, "cpu") is state
    on_meta = moved(state, "meta")
    assert list(on_meta) == list(state)
    assert all(on_meta[name].device.type == "meta" for name in state)
    assert all((on_meta[name].shape, on_meta[name].dtype) == (t.shape, t.dtype) for name, t in state.items())


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Debian's dataset-fashion-mnist package")
def test_a_new_student_on_a_device_is_made_there_uninitialised_and_loads_the_global_model():
    from flwr.app import ArrayRecord

    from fedmergenet.config import RunConfig
    from fedmergenet.flower.task import load_arrays
    from fedmergenet.models import initial_student, new_student

    cfg = RunConfig(dataset="fashion-mnist", train_limit=64, test_limit=32)
    global_model = initial_student(cfg)
    student = new_student(cfg, torch.device("cpu"))
    load_arrays(student, ArrayRecord(global_model.state_dict()))
    assert state_checksum(student.state_dict()) == state_checksum(global_model.state_dict())
    assert student.state_dict()["pre.1.num_batches_tracked"].dtype == torch.int64
