"""Teacher checkpoints, by example: what loads, and the one-line errors for what does not.

One 10-class ResNet50 checkpoint (~95 MB) is written once for the module and shared.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from fedmergenet.errors import CheckpointError
from fedmergenet.models import build_teacher, state_checksum
from fedmergenet.models import TEACHER_LAYER
from fedmergenet.teacher import load_teacher, placebo_teacher, save_teacher, teacher_for_run


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A Fashion-MNIST (10-class) teacher saved with save_teacher, and the model it came from."""
    torch.manual_seed(0)
    model = build_teacher(num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "teacher_resnet50_fashion-mnist.pt"
    save_teacher(model, path, dataset="fashion-mnist", epochs=3, test_top1=0.87)
    return path, model


def assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    assert "--pretrain-teacher" in message  # says how to make one


def test_save_then_load_gives_the_same_weights_and_info(saved):
    """load_teacher returns a frozen copy with identical tensors and what the checkpoint recorded."""
    path, model = saved
    loaded, info = load_teacher(path, dataset="fashion-mnist", num_classes=10)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert info.source == "checkpoint"
    assert (info.dataset, info.num_classes, info.epochs, info.test_top1) == ("fashion-mnist", 10, 3, 0.87)
    assert info.path == str(path.resolve())
    assert info.sha256 == state_checksum(original)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_checkpoint_is_a_plain_dict_loadable_with_weights_only(saved):
    """No pickled classes: torch.load(weights_only=True) reads it; no temporary file is left behind."""
    path, _ = saved
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["dataset"] == "fashion-mnist" and payload["num_classes"] == 10
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_missing_checkpoint_says_which_file_and_how_to_make_one(tmp_path):
    """A missing file is a one-line CheckpointError naming the file and the command that makes one."""
    path = tmp_path / "nowhere" / "teacher.pt"
    with pytest.raises(CheckpointError, match="not found") as exc:
        load_teacher(path, dataset="cifar100", num_classes=100)
    assert_one_line_naming(exc, path)
    assert "--pretrain-teacher --preset paper" in str(exc.value)  # the preset whose teacher recipe is cifar100's


def test_wrong_class_count_is_refused(saved):
    """A 10-class teacher asked to serve 100 classes fails at start-up, naming both shapes."""
    path, _ = saved
    with pytest.raises(CheckpointError, match=r"\(10, 2048\).*\(100, 2048\)") as exc:
        load_teacher(path, dataset="fashion-mnist", num_classes=100)
    assert_one_line_naming(exc, path)


def test_corrupt_file_is_refused(tmp_path):
    """Bytes that are not a torch checkpoint: a CheckpointError, not a pickle traceback."""
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="unreadable") as exc:
        load_teacher(path, dataset="fashion-mnist", num_classes=10)
    assert_one_line_naming(exc, path)


def test_truncated_checkpoint_is_refused(saved, tmp_path):
    """A half-copied checkpoint is as unreadable as a corrupt one."""
    path = tmp_path / "teacher.pt"
    with open(saved[0], "rb") as fh:
        path.write_bytes(fh.read(1_000_000))
    with pytest.raises(CheckpointError, match="unreadable"):
        load_teacher(path, dataset="fashion-mnist", num_classes=10)


def test_checkpoint_from_another_dataset_is_refused(saved):
    """A Fashion-MNIST teacher is not a CIFAR-100 one, even at the same class count."""
    path, _ = saved
    with pytest.raises(CheckpointError, match="trained on fashion-mnist, not cifar100") as exc:
        load_teacher(path, dataset="cifar100", num_classes=10)
    assert_one_line_naming(exc, path)


def test_a_file_without_a_state_dict_is_refused(tmp_path):
    """A bare state_dict or any other dict lacks the metadata and is refused."""
    path = tmp_path / "teacher.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_teacher(path, dataset="fashion-mnist", num_classes=10)


def test_the_placebo_teacher_shuffles_only_the_fused_matrix(saved):
    """The control arm's teacher: fc.weight with the same shape and the same values in another order
    (seeded), every other tensor untouched; its info says placebo."""
    path, _ = saved
    model, info = load_teacher(path, dataset="fashion-mnist", num_classes=10)
    placebo, placebo_info = placebo_teacher(model, info, seed=3)
    trained, shuffled = model.state_dict(), placebo.state_dict()
    matrix, control = trained[TEACHER_LAYER], shuffled[TEACHER_LAYER]
    assert control.shape == matrix.shape and not torch.equal(control, matrix)
    assert torch.equal(control.flatten().sort().values, matrix.flatten().sort().values)
    assert all(torch.equal(trained[k], shuffled[k]) for k in trained if k != TEACHER_LAYER)
    assert placebo_info.source == "placebo" and placebo_info.sha256 == state_checksum(shuffled)
    assert torch.equal(placebo_teacher(model, info, seed=3)[0].state_dict()[TEACHER_LAYER], control)
    assert not any(p.requires_grad for p in placebo.parameters())


def test_arms_awaiting_their_teacher_start_without_it_and_load_it_once_saved(saved, tmp_path):
    """--await-teacher (the suite's arms, started beside the teacher's pretraining): the checks
    before the first arm pass over the missing checkpoint, nobody else pretrains it, and the
    arm that fuses waits for it as it loads it."""
    from fedmergenet.config import RunConfig
    from fedmergenet.experiments.pretrain import ensure_teacher
    from fedmergenet.flower.server_app import check_arms

    source, model = saved
    path = tmp_path / "teacher.pt"
    cfg = RunConfig(dataset="fashion-mnist", teacher_checkpoint=str(path), fusion_arms="plain mergenet placebo",
                    await_teacher=True)
    assert cfg.teacher_pending and not cfg.replace(await_teacher=False).teacher_pending
    check_arms(cfg.arm_runs())
    assert ensure_teacher(cfg, echo=False) == path and not path.is_file()

    mergenet, loaded = cfg.arm_runs()[1], []

    def load() -> None:  # the MergeNet arm as it starts
        loaded.append(teacher_for_run(path=mergenet.teacher_path(), dataset="fashion-mnist", num_classes=10,
                                      random=False, placebo=False, seed=0, wait=mergenet.await_teacher))

    arm = threading.Thread(target=load, daemon=True)  # daemon: a wait that never ends fails, not hangs
    arm.start()
    time.sleep(0.5)
    assert arm.is_alive() and not loaded  # still waiting
    partial = tmp_path / "partial"  # saved as save_teacher does: the file appears whole
    partial.write_bytes(source.read_bytes())
    partial.replace(path)
    arm.join(timeout=30)
    assert not arm.is_alive() and not cfg.teacher_pending
    assert loaded[0][1].sha256 == state_checksum(model.state_dict())


def test_a_presets_own_missing_teacher_is_made_with_that_presets_recipe(tmp_path):
    """The gpu preset names its own checkpoint (its teacher is not the quick preset's): the hint
    for it pretrains with --preset gpu, and the dataset's default checkpoint with quick."""
    for name, preset in (("teacher_resnet50_fashion-mnist_gpu.pt", "gpu"),
                         ("teacher_resnet50_fashion-mnist.pt", "quick")):
        with pytest.raises(CheckpointError) as exc:
            load_teacher(tmp_path / name, dataset="fashion-mnist", num_classes=10)
        assert f"--preset {preset} --teacher-checkpoint {tmp_path / name}" in str(exc.value)
