"""The shared training loop, by example: the schedule clients resume, a loss that falls, honest metrics."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmergenet.models import STUDENT_LAYER, build_student
from fedmergenet.training import (
    SGD,
    AdamW,
    bn_statistics,
    evaluate,
    make_optimizer,
    make_scheduler,
    pool_bn_statistics,
    recalibrate_bn,
    train_epoch,
)

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def central_lrs(milestones: list[int], gamma: float, epochs: int) -> list[float]:
    """The learning rate at every epoch of the central baseline: one MultiStepLR step per epoch."""
    model = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(model, lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("start_epoch", [0, 1, 2, 3, 4, 5, 6, 7, 9])
def test_scheduler_started_at_epoch_e_matches_the_central_schedule(start_epoch):
    """A client at global epoch e trains with the lr the central baseline uses at epoch e,
    and keeps following it for the epochs after (milestones 3 and 6, gamma 0.2)."""
    milestones, gamma = [3, 6], 0.2
    expected = central_lrs(milestones, gamma, start_epoch + 3)
    model = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(model, lr=0.1)
    scheduler = make_scheduler(optimizer, milestones, gamma, start_epoch=start_epoch)
    for epoch in range(start_epoch, start_epoch + 3):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected[epoch], rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_positioning_the_scheduler_leaves_the_weights_alone():
    """Fast-forwarding the schedule steps the optimiser without gradients: no weight moves."""
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_scheduler(make_optimizer(model, lr=0.1, weight_decay=5e-4), [2], 0.1, start_epoch=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("ours, torchs, settings", [
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),  # the clients'
    (AdamW, torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01, "fused": True}),  # the adapter's
])
def test_our_optimisers_step_exactly_as_torchs(ours, torchs, settings):
    """Same weights, optimiser state and saved state as torch's own after steps with a
    schedule and a closure: they run torch's own code."""
    torch.manual_seed(0)
    our_model, torch_model = build_student(num_classes=10), build_student(num_classes=10)
    torch_model.load_state_dict(our_model.state_dict())
    images, labels = tiny_batch().tensors
    optimisers = ours(our_model.parameters(), **settings), torchs(torch_model.parameters(), **settings)
    for model, optimizer in zip((our_model, torch_model), optimisers):
        scheduler = make_scheduler(optimizer, [2], 0.2, start_epoch=1)
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)

            def closure(model=model) -> torch.Tensor:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
                loss.backward()
                return loss

            assert optimizer.step(closure).requires_grad  # the closure computes with gradients
            scheduler.step()
    assert all(torch.equal(a, b) for a, b in zip(our_model.state_dict().values(), torch_model.state_dict().values()))
    our_state, torch_state = (optimizer.state_dict() for optimizer in optimisers)
    assert our_state["param_groups"] == torch_state["param_groups"]
    assert our_state["state"].keys() == torch_state["state"].keys()
    for index, values in torch_state["state"].items():
        assert values.keys() == our_state["state"][index].keys()
        assert all(torch.equal(our_state["state"][index][key], value) for key, value in values.items())
    restored = ours(build_student(num_classes=10).parameters(), **settings)
    restored.load_state_dict(our_state)
    assert restored.state_dict()["param_groups"] == our_state["param_groups"]


def test_training_in_a_fresh_process_does_not_import_torchs_compiler():
    """A deployment ClientApp is a fresh process per message: making the optimiser, positioning
    its schedule and training an epoch must not pull in ``torch._dynamo`` (about a second), nor
    must the server's (or central MergeNet's) fusion and adapter update."""
    child = """
import sys, torch
from torch.utils.data import DataLoader, TensorDataset
from fedmergenet.models import build_student
from fedmergenet.training import make_optimizer, make_scheduler, train_epoch
model = build_student(num_classes=10)
optimizer = make_optimizer(model)
make_scheduler(optimizer, [2], 0.2, start_epoch=3)
data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
train_epoch(model, DataLoader(data, batch_size=4), optimizer, torch.device("cpu"), progress=False)
from fedmergenet.fusion.unit import KnowledgeFusionUnit
unit = KnowledgeFusionUnit(torch.randn(10, 64), (16, 32, 1, 1), device="cpu")
layer = torch.randn(16, 32, 1, 1)
assert unit.learn(unit.fuse(layer), layer) is not None
print(sorted(name for name in sys.modules if name.startswith("torch._dynamo")))
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.strip() == "[]", result.stdout


def tiny_batch(n: int = 16, classes: int = 10, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g))


def test_training_epochs_lower_the_loss_of_the_real_student():
    """Three epochs over one fixed tiny batch (seen twice per epoch) fit it: the loss falls."""
    torch.manual_seed(0)
    model = build_student(num_classes=10)
    images, labels = tiny_batch().tensors
    loader = DataLoader(TensorDataset(images.repeat(2, 1, 1, 1), labels.repeat(2)), batch_size=16, shuffle=False)
    optimizer = make_optimizer(model, lr=0.05)
    losses = [train_epoch(model, loader, optimizer, CPU, progress=False) for _ in range(3)]
    assert losses[-1] < losses[0] * 0.95, losses


def test_the_training_loop_takes_batches_made_on_the_device():
    """The GPU path's loader (the split on the device, augmented there in whole batches) feeds the
    same loop, BatchNorm recalibration and evaluation; here on the CPU."""
    from fedmergenet.data import DeviceBatches, ImageDataset

    torch.manual_seed(0)
    images, labels = tiny_batch(n=16).tensors
    ds = ImageDataset(name="toy", images=(images * 40 + 128).clamp(0, 255).to(torch.uint8), labels=labels,
                      num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.16, 0.16, 0.16))
    model = build_student(num_classes=10)
    # Every image twice per epoch, in a new order each epoch, without augmentation: the loop fits it.
    train = DeviceBatches(ds, list(range(16)) * 2, batch_size=16, train=True, seed=0, device=CPU, augment=False)
    optimizer = make_optimizer(model, lr=0.02)
    losses = [train_epoch(model, train, optimizer, CPU, progress=False) for _ in range(3)]
    assert losses[-1] < losses[0] * 0.95, losses
    recalibrate_bn(model, train, CPU)
    result = evaluate(model, DeviceBatches(ds, None, batch_size=64, train=False, seed=0, device=CPU), CPU)
    assert result.examples == 16 and torch.isfinite(torch.tensor(result.loss))


def test_recalibrated_batchnorm_statistics_are_the_datas_exact_moments():
    """After recalibrate_bn the first BatchNorm's running mean and variance are the exact per-channel
    moments of the convolution outputs over the whole loader, not a momentum average; a
    BatchNorm without running statistics is left as it is."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.BatchNorm2d(4, track_running_stats=False))
    data = tiny_batch(n=24)
    recalibrate_bn(model, DataLoader(data, batch_size=8), CPU)
    with torch.no_grad():
        outputs = model[0](data.tensors[0]).transpose(0, 1).reshape(4, -1)
    stats = bn_statistics(model)
    assert set(stats) == {"1.running_mean", "1.running_var"}
    assert torch.allclose(stats["1.running_mean"], outputs.mean(dim=1), atol=1e-5)
    assert torch.allclose(stats["1.running_var"], outputs.var(dim=1), rtol=1e-3)


def test_recalibration_gives_torchs_update_bn_statistics_and_restores_the_model():
    """The real student's recalibrated statistics and batch counters are those of torch's
    update_bn on the same batches in the same layout; momenta and the training flag are left as
    they were."""
    torch.manual_seed(0)
    start = build_student(num_classes=10).state_dict()
    batches = DataLoader(tiny_batch(n=40), batch_size=16)  # 16, 16, 8

    def recalibrated(recalibrate) -> torch.nn.Module:
        model = build_student(num_classes=10)
        model.load_state_dict(start)
        model.eval()
        recalibrate(model)
        return model

    ours = recalibrated(lambda m: recalibrate_bn(m, batches, CPU, memory_format=torch.contiguous_format))
    torchs = recalibrated(lambda m: torch.optim.swa_utils.update_bn(batches, m, CPU))
    for name, tensor in torchs.state_dict().items():
        assert torch.allclose(ours.state_dict()[name], tensor, rtol=1e-5, atol=1e-7), name
    assert not ours.training
    assert {m.momentum for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}


def test_recalibration_on_fewer_batches_gives_update_bns_statistics_of_those_batches():
    """``max_batches`` (``--recalibrate-batches``): the statistics are update_bn's over the
    loader's first batches only, which differ from those of the whole loader."""
    torch.manual_seed(0)
    start = build_student(num_classes=10).state_dict()
    data = tiny_batch(n=40)
    first_two = DataLoader(TensorDataset(*(t[:32] for t in data.tensors)), batch_size=16)

    def statistics(recalibrate) -> dict[str, torch.Tensor]:
        model = build_student(num_classes=10)
        model.load_state_dict(start)
        recalibrate(model)
        return bn_statistics(model)

    ours = statistics(lambda m: recalibrate_bn(m, DataLoader(data, batch_size=16), CPU, max_batches=2,
                                               memory_format=torch.contiguous_format))
    torchs = statistics(lambda m: torch.optim.swa_utils.update_bn(first_two, m, CPU))
    whole = statistics(lambda m: recalibrate_bn(m, DataLoader(data, batch_size=16), CPU))
    assert all(torch.allclose(ours[name], torchs[name], rtol=1e-5, atol=1e-7) for name in torchs)
    assert not all(torch.allclose(ours[name], whole[name], rtol=1e-3) for name in whole)


def test_forward_passes_on_a_cpu_run_in_channels_last_and_leave_the_model_as_it_was():
    """On a CPU evaluation and recalibration run in channels_last (faster there: BENCHMARKS.md,
    1a): the model sees channels_last batches, its weights are back in the ordinary layout
    afterwards, and what it gives differs from the default layout's by float32 rounding alone."""
    torch.manual_seed(0)
    start = build_student(num_classes=10).state_dict()
    batches = DataLoader(tiny_batch(n=40), batch_size=16)
    layouts: list[bool] = []

    def fresh() -> torch.nn.Module:
        model = build_student(num_classes=10)
        model.load_state_dict(start)
        model.pre.register_forward_pre_hook(
            lambda _, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
        return model

    def passes(memory_format: torch.memory_format | None) -> tuple[dict[str, torch.Tensor], tuple[float, ...]]:
        model = fresh()
        recalibrate_bn(model, batches, CPU, memory_format=memory_format)
        result = evaluate(model, batches, CPU, memory_format=memory_format)
        assert all(tensor.is_contiguous() for tensor in model.state_dict().values())
        return bn_statistics(model), (result.loss, result.top1, result.top5)

    ours, ours_metrics = passes(None)
    assert layouts == [True] * 6  # three batches recalibrated, three evaluated
    default, default_metrics = passes(torch.contiguous_format)
    assert not any(layouts[6:])
    assert all(torch.allclose(ours[name], default[name], rtol=1e-3, atol=1e-5) for name in default)
    assert ours_metrics == pytest.approx(default_metrics, rel=1e-4)


def test_on_a_gpu_a_recorded_forward_pass_runs_in_channels_last_and_an_eager_one_in_the_default_layout():
    """Measured, not assumed (README, Performance): a recorded recalibration replayed faster in
    channels_last on an H200, as training's recorded step does; eager passes there were slower in
    it. A CPU runs every forward pass in channels_last."""
    from fedmergenet.training import forward_memory_format

    cuda = torch.device("cuda")
    assert forward_memory_format(cuda, recorded=True) == torch.channels_last
    assert forward_memory_format(cuda) == torch.contiguous_format
    assert forward_memory_format(CPU) == forward_memory_format(CPU, recorded=True) == torch.channels_last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_recorded_recalibration_on_the_gpu_sees_channels_last_batches_and_an_eager_one_does_not():
    """On a GPU (skipped elsewhere): the layout each recalibration runs in, as the model sees it,
    and the weights back in the ordinary layout after either."""
    cuda = torch.device("cuda")
    model = build_student(num_classes=10).to(cuda)
    layouts: list[bool] = []
    model.pre.register_forward_pre_hook(
        lambda _, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    batches = DataLoader(tiny_batch(n=48), batch_size=16)
    recalibrate_bn(model, batches, cuda)
    recorded = layouts[:]
    layouts.clear()
    recalibrate_bn(model, batches, cuda, capture=False)
    assert recorded and all(recorded) and layouts and not any(layouts)
    assert all(tensor.is_contiguous() for tensor in model.state_dict().values())


def test_a_client_recalibrates_on_the_batches_its_run_config_names(tmp_path, monkeypatch):
    """A client's statistics for the server come from the first ``recalibrate-batches`` batches
    of its training split (the same batches every round), or from all of them by default."""
    from fedmergenet.config import RunConfig
    from fedmergenet.data.splits import client_data
    from fedmergenet.flower.client_app import recomputed_statistics

    monkeypatch.setenv("FEDMERGENET_CACHE_DIR", str(tmp_path / "cache"))
    cfg = RunConfig(dataset="fashion-mnist", data_dir=str(tmp_path), train_limit=120, batch_size=16)
    torch.manual_seed(0)
    start = build_student(num_classes=10).state_dict()

    def statistics(recalibrate) -> dict[str, torch.Tensor]:
        model = build_student(num_classes=10)
        model.load_state_dict(start)
        return recalibrate(model)

    def by_hand(batches: int):
        def recalibrate(model):
            recalibrate_bn(model, list(client_data(cfg, 0, 2).train)[:batches], CPU)
            return bn_statistics(model)
        return recalibrate

    two = statistics(lambda m: recomputed_statistics(cfg.replace(recalibrate_batches=2), m, 0, 2, CPU))
    every = statistics(lambda m: recomputed_statistics(cfg, m, 0, 2, CPU))
    for ours, expected in ((two, statistics(by_hand(2))), (every, statistics(by_hand(len(client_data(cfg, 0, 2).train))))):
        assert all(torch.allclose(ours[name], expected[name], rtol=1e-5, atol=1e-7) for name in expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_leaves_the_gpu_waiting_on_it_once_per_dtype_not_once_per_tensor():
    """On a GPU (skipped elsewhere): the student's state comes back to the host in one copy per
    dtype (float32 and int64), each a wait or two on the card (torch may report a copy to pageable
    host memory as two), where 373 tensors one by one wait at least 373 times."""
    import warnings

    from fedmergenet.training import moved

    cuda = torch.device("cuda")
    state = build_student(num_classes=10).to(cuda).state_dict()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as waits:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            on_host = moved(state, "cpu")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    dtypes = {tensor.dtype for tensor in state.values()}
    assert 1 <= len([w for w in waits if "synchroniz" in str(w.message)]) <= 2 * len(dtypes) < len(state)
    assert all(torch.equal(on_host[name], tensor.cpu()) for name, tensor in state.items())
    assert all(torch.equal(moved(on_host, cuda)[name], tensor) for name, tensor in state.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_recorded_gpu_step_keeps_the_model_and_optimiser_it_replays_alive():
    """On a GPU (skipped elsewhere): a recording replays kernels on its model's weights and its
    optimiser's buffers, so it holds them: a recorded step kept on its own, as
    benchmarks/sharing.py keeps its students' steps, still trains once every other reference to
    its model is gone."""
    import gc
    import weakref

    from fedmergenet.training import CAPTURE_WARMUP_STEPS, _CapturedStep, _on_side_stream, _Step

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    model = build_student(num_classes=10).to(cuda).train()
    step = _Step(model, make_optimizer(model, lr=0.01), proximal=None)
    images, labels = torch.randn(16, 3, 32, 32, device=cuda), torch.randint(0, 10, (16,), device=cuda)
    for _ in range(CAPTURE_WARMUP_STEPS):
        _on_side_stream(step, images, labels)
    recorded = _CapturedStep(step, images, labels)
    model_ref = weakref.ref(model)
    del model, step
    gc.collect()
    assert model_ref() is not None
    before = model_ref().state_dict()[STUDENT_LAYER].clone()
    losses = torch.stack([recorded(images, labels) for _ in range(3)])
    assert torch.isfinite(losses).all()
    assert not torch.equal(model_ref().state_dict()[STUDENT_LAYER], before)


def test_a_recorded_recalibration_sums_every_batch_once(monkeypatch: pytest.MonkeyPatch):
    """The recorded path's order, with the CUDA graph stood in for by a replay that runs the
    forward eagerly (the GPU test below records for real): the first batch warms up eagerly,
    the next is recorded and replayed like every further full batch, a last partial batch runs
    eagerly; each batch's moments are summed once, so the statistics are the eager path's."""
    import fedmergenet.training as training

    calls: list[str] = []

    class StandIn:
        def __init__(self, run, images: torch.Tensor) -> None:
            self.run, self.shape = run, images.shape
            calls.append("record")

        def fits(self, images: torch.Tensor) -> bool:
            return images.shape == self.shape

        def __call__(self, images: torch.Tensor) -> None:
            calls.append("replay")
            self.run(images)

    def warm_up(run, images: torch.Tensor) -> None:
        calls.append("warm-up")
        run(images)

    monkeypatch.setattr(training, "_Recorded", StandIn)
    monkeypatch.setattr(training, "_on_side_stream", warm_up)
    torch.manual_seed(0)
    start = build_student(num_classes=10).state_dict()
    batches = [torch.randn(16, 3, 32, 32) for _ in range(4)] + [torch.randn(8, 3, 32, 32)]

    def statistics(recalibrate) -> dict[str, torch.Tensor]:
        model = build_student(num_classes=10)
        model.load_state_dict(start)
        recalibrate(model)
        return model.state_dict()

    recorded = statistics(lambda m: recalibrate_bn(m, batches, CPU, capture=True))
    assert calls == ["warm-up", "record", "replay", "replay", "replay"]  # then the partial batch, eagerly
    eager = statistics(lambda m: recalibrate_bn(m, batches, CPU, capture=False))
    for name, tensor in eager.items():
        assert torch.allclose(recorded[name], tensor, rtol=1e-5, atol=1e-7), name


def test_a_recorded_training_epoch_steps_every_batch_once_between_its_hooks(monkeypatch: pytest.MonkeyPatch):
    """The recorded training loop's order, with the CUDA graph stood in for by a replay that runs
    the step eagerly (the GPU tests below record for real): the first batch warms up eagerly, the
    next is recorded and replayed like every further full batch, a last partial batch runs
    eagerly; each batch is stepped once, between its hooks, so losses and weights are the eager
    loop's."""
    import fedmergenet.training as training

    calls: list[str] = []

    class StandIn:
        def __init__(self, step, images: torch.Tensor, labels: torch.Tensor) -> None:
            self.step, self.shapes = step, (images.shape, labels.shape)
            calls.append("record")

        def fits(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
            return (images.shape, labels.shape) == self.shapes

        def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            calls.append("replay")
            return self.step(images, labels)

    def warm_up(run, *inputs: torch.Tensor) -> torch.Tensor:
        calls.append("warm-up")
        return run(*inputs)

    monkeypatch.setattr(training, "_CapturedStep", StandIn)
    monkeypatch.setattr(training, "_on_side_stream", warm_up)
    torch.manual_seed(0)
    start = build_student(num_classes=10).state_dict()
    batches = [(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))) for n in (16, 16, 16, 16, 8)]

    def trained(capture: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model = build_student(num_classes=10)
        model.load_state_dict(start)
        calls.append("epoch")
        loss = training._train_epoch(
            model, batches, make_optimizer(model, lr=0.05), CPU, "train", lambda *_: calls.append("before"),
            lambda *_: calls.append("after"), False, torch.channels_last, None, capture, None)
        return loss, model.state_dict()

    recorded_loss, recorded = trained(capture=True)
    assert calls == ["epoch",
                     "before", "warm-up", "after",
                     "before", "record", "replay", "after",
                     "before", "replay", "after",
                     "before", "replay", "after",
                     "before", "after"]  # the partial batch, eagerly
    eager_loss, eager = trained(capture=False)
    assert recorded_loss == eager_loss
    for name, tensor in eager.items():
        assert torch.equal(recorded[name], tensor), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_recorded_recalibration_on_the_gpu_gives_the_eager_statistics_without_waiting_per_batch():
    """On a GPU (skipped elsewhere): the recorded recalibration (a CUDA graph of the forward pass
    and the sums, replayed per batch) gives the statistics and batch counters of the eager one
    over the same batches, a last partial batch included; and it waits on the host no more
    often over 9 batches than over 3 (update_bn waits once per BatchNorm per batch). Both run in
    one layout with TF32 off: recorded and eager passes default to different layouts, whose
    convolutions differ in the third digit under TF32, which is not what this test is about."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    start = build_student(num_classes=10).state_dict()
    images = [torch.randn(32, 3, 32, 32, device=cuda) for _ in range(8)] + [torch.randn(8, 3, 32, 32, device=cuda)]

    def recalibrated(batches: list[torch.Tensor], capture: bool) -> tuple[dict[str, torch.Tensor], int]:
        model = build_student(num_classes=10)
        model.load_state_dict(start)
        model.to(cuda)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as waits:
                warnings.simplefilter("always")
                recalibrate_bn(model, batches, cuda, capture=capture, memory_format=torch.channels_last)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        state = {name: tensor.cpu() for name, tensor in model.state_dict().items()
                 if name.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        return state, len([w for w in waits if "synchroniz" in str(w.message)])

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        eager, _ = recalibrated(images, capture=False)
        recorded, waits_over_9 = recalibrated(images, capture=True)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    for name, tensor in eager.items():
        assert torch.allclose(recorded[name], tensor, rtol=1e-4, atol=1e-6), name
    assert recorded["stage6.2.residual.7.num_batches_tracked"] == 9
    _, waits_over_3 = recalibrated(images[:3], capture=True)
    assert waits_over_9 == waits_over_3


def test_pooled_statistics_are_those_of_the_union_of_the_clients_data():
    """Two clients' means and variances, pooled by their sizes, equal the moments of their union."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 30, generator=g), torch.randn(4, 10, generator=g) * 2 + 1
    client = lambda x: {"bn.running_mean": x.mean(1), "bn.running_var": x.var(1, unbiased=False)}  # noqa: E731
    pooled = pool_bn_statistics([client(a), client(b)], weights=[30, 10])
    union = torch.cat([a, b], dim=1)
    assert torch.allclose(pooled["bn.running_mean"], union.mean(1), atol=1e-6)
    assert torch.allclose(pooled["bn.running_var"], union.var(1, unbiased=False), atol=1e-5)


def test_evaluate_reports_loss_top1_top5_and_examples():
    """evaluate returns mean loss, top-1 <= top-5 fractions in [0, 1] and the number of examples."""
    torch.manual_seed(0)
    model = build_student(num_classes=10)
    result = evaluate(model, DataLoader(tiny_batch(n=20), batch_size=8), CPU)
    assert result.examples == 20
    assert 0.0 <= result.top1 <= result.top5 <= 1.0
    assert result.loss > 0 and torch.isfinite(torch.tensor(result.loss))


def test_evaluate_counts_exact_hits():
    """A model that always answers class 0 gets top-1 = share of label 0; with 3 classes top-5 is 1."""
    labels = torch.tensor([0, 0, 1, 2])
    data = TensorDataset(torch.zeros(4, 2), labels)

    class AlwaysZero(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[3.0, 2.0, 1.0]]).expand(x.shape[0], 3)

    result = evaluate(AlwaysZero(), DataLoader(data, batch_size=3), CPU)
    assert (result.top1, result.top5, result.examples) == (0.5, 1.0, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_client_trains_on_the_gpu_from_batches_made_there(tmp_path, monkeypatch):
    """On a GPU (skipped elsewhere): the client's partition goes to the card and its batches are
    made there; a round of local training gives a finite loss and leaves the weights on the card."""
    from pathlib import Path

    from fedmergenet.config import RunConfig
    from fedmergenet.data import DeviceBatches, ImageDataset
    from fedmergenet.data.datasets import _find_idx_pair, fashion_mnist_dirs
    from fedmergenet.data.splits import client_data
    from fedmergenet.flower.client_app import local_train
    from fedmergenet.models import new_student

    cuda = torch.device("cuda")
    images, labels = tiny_batch(n=64).tensors
    ds = ImageDataset(name="toy", images=(images * 40 + 128).clamp(0, 255).to(torch.uint8), labels=labels,
                      num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batches = DeviceBatches(ds, None, batch_size=16, train=True, seed=0, device=cuda)
    x, y = next(iter(batches))
    assert x.is_cuda and y.is_cuda and x.shape == (16, 3, 32, 32)
    # The project's data folder (where scripts/gpu_machine.sh unpacks Fashion-MNIST), then the system's.
    data_dir = Path(__file__).resolve().parents[1] / "data"
    if _find_idx_pair(fashion_mnist_dirs(data_dir), train=True) is None:
        pytest.skip("the client part needs Fashion-MNIST: Debian's dataset-fashion-mnist package or data/fashion-mnist/")
    monkeypatch.setenv("FEDMERGENET_CACHE_DIR", str(tmp_path / "cache"))
    cfg = RunConfig(dataset="fashion-mnist", data_dir=str(data_dir), train_limit=96, batch_size=16, device="cuda")
    assert isinstance(client_data(cfg, 0, 2, device=cuda).train, DeviceBatches)
    model = new_student(cfg).to(cuda)
    loss, examples = local_train(cfg, model, 0, 2, server_round=1, device=cuda)
    assert examples > 0 and torch.isfinite(torch.tensor(loss))
    assert next(model.parameters()).is_cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.parametrize("compile_backend", [None, "inductor"])
def test_the_recorded_cuda_step_trains_as_the_eager_loop(monkeypatch, hooked, compile_backend):
    """On a GPU (skipped elsewhere): replaying the recorded training step gives the eager loop's
    losses and weights from the same start and batches, FedProx's term and a last partial batch
    included, over two epochs (a new recording each: the learning rate moves between them).
    ``hooked``: hooks between the steps write a layer in place and read it back, as the central
    MergeNet arm's fusion does, and see the same values either way. ``inductor``: the step
    recorded and the one it is compared with are torch.compile's (``--compile``): a trajectory of
    14 steps is compared between the same kernels only, since this tiny run turns a 1e-6 change of
    the weights into a 0.5-1.7 % change of its losses (the next test compares compiled and eager)."""
    import fedmergenet.training as training
    from fedmergenet.data import DeviceBatches, ImageDataset
    from fedmergenet.training import Proximal

    recordings = []

    class CountedStep(training._CapturedStep):
        def __init__(self, *args):
            super().__init__(*args)
            recordings.append(self)

    monkeypatch.setattr(training, "_CapturedStep", CountedStep)
    cuda = torch.device("cuda")
    images, labels = tiny_batch(n=200).tensors
    ds = ImageDataset(name="toy", images=(images * 40 + 128).clamp(0, 255).to(torch.uint8), labels=labels,
                      num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.manual_seed(0)
    start = build_student(num_classes=10).state_dict()

    def run(capture: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        model = build_student(num_classes=10)
        model.load_state_dict(start)
        model.to(cuda)
        optimizer = make_optimizer(model, lr=0.05)
        scheduler = make_scheduler(optimizer, milestones=[1], gamma=0.2)
        proximal = Proximal.at(model, mu=0.01)
        batches = DeviceBatches(ds, None, batch_size=32, train=True, seed=1, device=cuda)  # 6 full, then 8
        layer = model.get_parameter(STUDENT_LAYER)
        seen = []

        def shrink(step: int, *_) -> None:
            if step % 2 == 0:
                with torch.no_grad():
                    layer.copy_(layer * 0.9)

        def read(*_) -> None:
            seen.append(float(layer.detach().norm()))

        hooks = {"before_step": shrink, "after_step": read} if hooked else {}
        losses = []
        for _ in range(2):
            losses.append(train_epoch(model, batches, optimizer, cuda, proximal=proximal, capture=capture,
                                      compile_backend=compile_backend, **hooks))
            scheduler.step()
        return losses + seen, {k: v.detach().cpu() for k, v in model.state_dict().items()}

    eager_losses, eager = run(capture=False)
    assert recordings == []
    captured_losses, captured = run(capture=True)
    assert len(recordings) == 2
    assert captured_losses == pytest.approx(eager_losses, rel=1e-3)
    for name, tensor in eager.items():
        if tensor.is_floating_point():
            gap = (captured[name] - tensor).norm() / tensor.norm().clamp_min(1e-6)
            assert gap < 1e-3, name
        else:
            assert torch.equal(captured[name], tensor), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_compiled_cuda_step_is_as_close_to_exact_as_the_eager_step():
    """On a GPU (skipped elsewhere): from the same weights and batch, one step of torch.compile's
    Inductor code (``--compile``) lands as close to the exact step (float64, eager, on the CPU)
    as the eager float32 step does: loss and every weight's update within 10x the eager step's
    error. The two float32 steps cannot be compared with each other alone: cuDNN's convolutions
    run in TF32 by default, which puts both about 1e-3 from the exact loss and lets fused kernels
    land 2e-5 apart (seen on an H200); a defect (a wrong or missing operation) moves a loss or an
    update by its own size."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    start = build_student(num_classes=10).state_dict()
    images, labels = tiny_batch(n=32).tensors

    def one_step(device: torch.device, dtype: torch.dtype,
                 compile_backend: str | None) -> tuple[float, dict[str, torch.Tensor]]:
        model = build_student(num_classes=10)
        model.load_state_dict(start)
        model.to(device=device, dtype=dtype)
        batch = [(images.to(device, dtype), labels.to(device))]
        loss = train_epoch(model, batch, make_optimizer(model, lr=0.05), device, capture=False,
                           compile_backend=compile_backend)
        return loss, {name: p.detach().cpu().double() - start[name].double() for name, p in model.named_parameters()}

    exact_loss, exact = one_step(CPU, torch.float64, None)
    eager_loss, eager = one_step(cuda, torch.float32, None)
    compiled_loss, compiled = one_step(cuda, torch.float32, "inductor")
    assert abs(compiled_loss - exact_loss) <= 10 * abs(eager_loss - exact_loss) + 1e-6 * exact_loss
    # Some updates are exactly zero (a bias whose shift the next BatchNorm removes): their
    # rounding noise is measured against the whole update's size.
    floor = 1e-6 * torch.cat([update.flatten() for update in exact.values()]).norm()
    for name, update in exact.items():
        assert (compiled[name] - update).norm() <= 10 * (eager[name] - update).norm() + floor, name


def test_a_compiled_step_trains_as_the_eager_one_and_compiles_once_per_process():
    """``--compile``'s path, shown on the CPU with a backend that needs no C++ toolchain: full
    batches run torch.compile's forward and backward and give the eager loop's losses and weights;
    the last partial batch stays eager, and a second model of the same architecture (the next
    round's, another client's) reuses the compiled code instead of compiling again."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data = tiny_batch(n=40)  # two batches of 16, then one of 8
    torch.manual_seed(0)
    start = build_student(num_classes=10).state_dict()

    def run(compile_backend: str | None) -> tuple[list[float], dict[str, torch.Tensor]]:
        model = build_student(num_classes=10)
        model.load_state_dict(start)
        optimizer = make_optimizer(model, lr=0.05)
        losses = [train_epoch(model, DataLoader(data, batch_size=16), optimizer, CPU, compile_backend=compile_backend)
                  for _ in range(2)]
        return losses, model.state_dict()

    eager_losses, eager = run(None)
    for _ in range(2):
        compiled_losses, compiled = run("aot_eager")
        assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
        for name, tensor in eager.items():
            assert torch.allclose(compiled[name].float(), tensor.float(), rtol=1e-4, atol=1e-5), name
    assert counters["stats"]["unique_graphs"] == 1
