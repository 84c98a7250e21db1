"""MergeNet's adapter and the fusion unit, by example.

Real shapes ([160, 960] student, [100 or 10, 2048] teacher) only where the behaviour depends
on them (shapes, scale); everything else uses small matrices so the file runs in seconds.
"""

from __future__ import annotations

import pytest
import torch

from fedmergenet.config import AdapterConfig
from fedmergenet.fusion import KnowledgeFusionUnit, ParamAttention
from fedmergenet.models import STUDENT_LAYER, build_student

SMALL_STUDENT = (16, 32, 1, 1)
SMALL_TEACHER = (10, 64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 0.05-scale student layer, a teacher matrix and a target close to the student."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(SMALL_STUDENT, generator=g) * 0.05
    teacher = torch.randn(SMALL_TEACHER, generator=g)
    target = student + 0.02 * torch.randn(SMALL_STUDENT, generator=g)
    return student, teacher, target


def small_unit(teacher: torch.Tensor, mode: str = "gated", seed: int = 0, device: str = "cpu",
               **cfg) -> KnowledgeFusionUnit:
    config = AdapterConfig(**{"h": 2, "lr": 0.01, "warmup_updates": 100, "mode": mode, **cfg})
    return KnowledgeFusionUnit(teacher, SMALL_STUDENT, config, total_updates=200, device=device, seed=seed)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def params_of(unit: KnowledgeFusionUnit) -> list[torch.Tensor]:
    return [p.detach().clone() for p in unit.parameters()]


# --- ParamAttention ------------------------------------------------------------------


@pytest.mark.parametrize("teacher_rows", [100, 10])
def test_param_attention_maps_the_real_student_matrix_to_its_own_shape(teacher_rows):
    """[160, 960] attending to fc.weight of a 100- or 10-class teacher comes out [160, 960]."""
    torch.manual_seed(0)
    adapter = ParamAttention((160, 960), (teacher_rows, 2048), heads=8, num_layers=2)
    with torch.no_grad():
        out = adapter(torch.randn(160, 960) * 0.02, torch.randn(teacher_rows, 2048))
    assert out.shape == (160, 960)
    assert torch.isfinite(out).all()


def test_param_attention_works_for_arbitrary_small_shapes():
    """Nothing is tied to MobileNetV2: a 7x13 student and a 5x11 teacher work too."""
    adapter = ParamAttention((7, 13), (5, 11), heads=2, num_layers=1)
    out = adapter(torch.randn(7, 13), torch.randn(5, 11))
    assert out.shape == (7, 13)
    out.sum().backward()  # and it is differentiable end to end
    assert all(p.grad is not None for p in adapter.parameters())


# --- fuse ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gated", "replace"])
def test_fuse_returns_a_layer_of_the_same_shape_and_dtype(mode):
    """fuse() gives back a tensor shaped, typed and placed like its input, detached from the graph."""
    student, teacher, _ = small_problem()
    unit = small_unit(teacher, mode)
    for layer in (student, student.double()):
        fused = unit.fuse(layer)
        assert (fused.shape, fused.dtype, fused.device) == (layer.shape, layer.dtype, layer.device)
        assert not fused.requires_grad


def test_fuse_rejects_a_layer_of_another_shape():
    """The unit is built for one layer shape; anything else is a ValueError, not a silent reshape."""
    _, teacher, _ = small_problem()
    with pytest.raises(ValueError, match="shape"):
        small_unit(teacher).fuse(torch.zeros(16, 31, 1, 1))


@pytest.mark.parametrize("mode", ["gated", "replace"])
def test_the_adapter_learns_to_move_the_layer_toward_the_target(mode):
    """Repeated fuse() + learn() against a fixed target at least halves the fused layer's distance to it."""
    student, teacher, target = small_problem()
    unit = small_unit(teacher, mode)
    distances = []
    for _ in range(40):
        fused = unit.fuse(student)
        distances.append(float((fused - target).norm()))
        unit.learn(fused, target)
    assert distances[-1] < 0.5 * distances[0], distances


def test_gated_first_fusion_of_a_real_layer_barely_moves_it():
    """Default gated mode: the first fusion of a real-scale [160, 960, 1, 1] layer moves it by < 1% of
    its norm (the gate starts at zero), so fusing cannot wreck a trained model."""
    torch.manual_seed(0)
    layer = build_student(num_classes=10).state_dict()[STUDENT_LAYER]
    unit = KnowledgeFusionUnit(torch.randn(10, 2048), tuple(layer.shape), AdapterConfig(), total_updates=10, device="cpu")
    fused = unit.fuse(layer)
    assert float((fused - layer).norm()) < 0.01 * float(layer.norm())


@pytest.mark.parametrize("mode", ["gated", "replace"])
def test_the_fused_layer_keeps_the_incoming_layers_norm(mode):
    """Whatever the adapter writes (replace: unit-scale LayerNorm output; gated: a perturbation),
    the fused layer is rescaled to the norm of the layer it came from, so its scale cannot compound."""
    torch.manual_seed(0)
    layer = build_student(num_classes=10).state_dict()[STUDENT_LAYER]
    unit = KnowledgeFusionUnit(torch.randn(10, 2048), tuple(layer.shape), AdapterConfig(mode=mode),
                               total_updates=10, device="cpu")
    with torch.no_grad():
        unit.gate.fill_(5.0)  # a gate far open: the perturbation is 5x the layer's own std
    fused = unit.fuse(layer)
    assert float(fused.norm()) == pytest.approx(float(layer.norm()), rel=1e-4)
    assert float((fused - layer).norm()) > 0.1 * float(layer.norm())  # it did change the layer


def fuse_step_learn(unit: KnowledgeFusionUnit, layer: torch.nn.Parameter, optimizer: torch.optim.Optimizer,
                    inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """One cycle as the central MergeNet arm runs it: fuse into the layer, one SGD step, learn."""
    fused = unit.fuse(layer.detach())
    assert fused is not None
    with torch.no_grad():
        layer.copy_(fused)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(inputs @ layer.reshape(layer.shape[0], -1).t(), targets).backward()
    optimizer.step()
    unit.learn(fused, layer.detach())


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "teacher_kind"), [("gated", "trained-like"), ("replace", "random")])
def test_a_thousand_fusion_cycles_keep_the_layer_finite_and_its_scale(mode, teacher_kind):
    """1,000 cycles of fuse -> one SGD step (lr 0.1, momentum 0.9, wd 5e-4) -> learn, with the adapter's
    lr 30x the default so the gate opens as far as learning takes it: the layer stays finite and its
    std within 2x of where it started. (Without the norm-preserving rescale the std compounds; see
    the real-scale tests below and test_e2e.py.)"""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(SMALL_TEACHER, generator=g)
    if teacher_kind == "trained-like":  # class rows that differ in structure, not only noise
        teacher = teacher * 0.02 + torch.linspace(-0.1, 0.1, SMALL_TEACHER[0])[:, None]
    layer = torch.nn.Parameter(torch.randn(SMALL_STUDENT, generator=g) * 0.05)
    start_std = float(layer.detach().std())
    unit = small_unit(teacher, mode, lr=0.03, warmup_updates=1000)
    optimizer = torch.optim.SGD([layer], lr=0.1, momentum=0.9, weight_decay=5e-4)
    # A regression whose solution has the layer's own scale: without fusion SGD keeps the std near 0.05.
    inputs = torch.randn(64, 32, generator=g)
    targets = inputs @ (torch.randn(16, 32, generator=g) * 0.05).t()
    for _ in range(1000):
        fuse_step_learn(unit, layer, optimizer, inputs, targets)
    assert torch.isfinite(layer).all()
    assert 0.5 * start_std < float(layer.detach().std()) < 2 * start_std
    if mode == "gated":
        assert abs(float(unit.gate.detach())) > 0.1  # fusion did act: the gate opened


@pytest.mark.slow  # the real 37M-parameter adapter: about 2 s a cycle on 2 cores
def test_real_scale_cycles_with_the_gate_open_keep_the_layers_std():
    """The real [160, 960] layer against a 10-class teacher, the gate forced to 1 (where the std grew
    150x in 100 fusions before the rescale, about 1.4x per fusion): 6 cycles leave it within 2x."""
    torch.manual_seed(0)
    layer = torch.nn.Parameter(build_student(num_classes=10).state_dict()[STUDENT_LAYER].clone())
    start_std = float(layer.detach().std())
    unit = KnowledgeFusionUnit(torch.randn(10, 2048), tuple(layer.shape), AdapterConfig(), total_updates=100,
                               device="cpu")
    with torch.no_grad():
        unit.gate.fill_(1.0)
    optimizer = torch.optim.SGD([layer], lr=0.1, momentum=0.9, weight_decay=5e-4)
    inputs = torch.randn(32, 960)
    targets = inputs @ (torch.randn(160, 960) * start_std).t()
    for _ in range(6):
        fuse_step_learn(unit, layer, optimizer, inputs, targets)
    assert torch.isfinite(layer).all()
    assert 0.5 * start_std < float(layer.detach().std()) < 2 * start_std


def test_a_non_finite_adapter_output_is_refused_and_the_unit_goes_on():
    """A NaN inside the adapter: fuse() returns None (the caller keeps its layer) and nothing is
    pending; once the adapter is sound again fusion works as before."""
    student, teacher, target = small_problem()
    unit = small_unit(teacher, "replace")
    weight = unit.adapter.layers[0].output.layernorm.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0] = float("nan")
    assert unit.fuse(student) is None
    with pytest.raises(RuntimeError, match="fuse"):
        unit.learn(student, target)
    with torch.no_grad():
        weight.copy_(saved)
    fused = unit.fuse(student)
    assert fused is not None and torch.isfinite(fused).all()
    assert unit.learn(fused, target) is not None


def test_an_update_toward_a_non_finite_layer_is_refused():
    """learn() toward a layer that training made non-finite changes nothing and returns None."""
    student, teacher, _ = small_problem()
    unit = small_unit(teacher)
    before = params_of(unit)
    fused = unit.fuse(student)
    assert unit.learn(fused, torch.full_like(student, float("inf"))) is None
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(unit)))
    assert unit.updates == 0


def test_the_gate_rate_lets_a_short_run_open_the_gate():
    """A federated run learns once per round: with few updates the gate's rate is 0.5/updates, so it
    can travel about 0.5 over the run; a long run keeps 10x the adapter's rate."""
    _, teacher, _ = small_problem()
    short = KnowledgeFusionUnit(teacher, SMALL_STUDENT, AdapterConfig(h=2), total_updates=4, device="cpu")
    long = KnowledgeFusionUnit(teacher, SMALL_STUDENT, AdapterConfig(h=2), total_updates=10_000, device="cpu")
    assert short.optimizer.param_groups[-1]["lr"] == pytest.approx(0.125)
    assert long.optimizer.param_groups[-1]["lr"] == pytest.approx(10 * AdapterConfig().lr)


# --- learn ----------------------------------------------------------------------------------


def test_learn_without_a_fuse_raises():
    """learn() needs the graph of the last fuse(); before any fuse (or twice after one) it refuses."""
    student, teacher, target = small_problem()
    unit = small_unit(teacher)
    with pytest.raises(RuntimeError, match="fuse"):
        unit.learn(student, target)
    fused = unit.fuse(student)
    unit.learn(fused, target)
    with pytest.raises(RuntimeError, match="fuse"):
        unit.learn(fused, target)


def test_learn_rejects_a_tensor_that_is_not_the_last_fused_output():
    """Learning from the wrong tensor would train the adapter on a graph it did not produce."""
    student, teacher, target = small_problem()
    unit = small_unit(teacher, "replace")
    first = unit.fuse(student)
    second = unit.fuse(student * 1.5)
    with pytest.raises(ValueError, match="last fuse.*largest difference"):
        unit.learn(first, target)
    unit.learn(second, target)  # the last output is accepted


def test_the_teacher_matrix_never_changes():
    """The teacher is frozen: fuse() and learn() leave the caller's matrix and the unit's copy untouched."""
    student, teacher, target = small_problem()
    original = teacher.clone()
    unit = small_unit(teacher, "replace")
    kept = unit.teacher.clone()
    for _ in range(3):
        unit.learn(unit.fuse(student), target)
    assert torch.equal(teacher, original)
    assert torch.equal(unit.teacher, kept)
    assert not unit.teacher.requires_grad
    assert all(p is not unit.teacher for p in unit.parameters())


def test_learning_moves_the_gate_off_zero_and_then_the_adapter():
    """Gated mode: the first update opens the gate (at zero the adapter gets no gradient); the next
    ones train the adapter's own weights. The loss returned is the mean squared gap."""
    student, teacher, target = small_problem()
    unit = small_unit(teacher)
    assert float(unit.gate.detach()) == 0.0
    fused = unit.fuse(student)
    loss = unit.learn(fused, target)
    assert loss == pytest.approx(float((student - target).pow(2).mean()), rel=1e-5)
    assert float(unit.gate.detach()) != 0.0
    before = params_of(unit)[:-1]  # the adapter's, without the gate
    unit.learn(unit.fuse(student), target)
    changed = [not torch.equal(a, b) for a, b in zip(before, params_of(unit)[:-1])]
    assert sum(changed) > len(changed) // 2
    assert unit.updates == 2


def test_replace_mode_trains_the_adapter_from_the_first_update():
    """Replace mode has no gate: the adapter's parameters change after one learn()."""
    student, teacher, target = small_problem()
    unit = small_unit(teacher, "replace")
    before = params_of(unit)
    unit.learn(unit.fuse(student), target)
    changed = [not torch.equal(a, b) for a, b in zip(before, params_of(unit))]
    assert sum(changed) > len(changed) // 2


# --- state ------------------------------------------------------------------------------------


def trained_unit(mode: str = "gated") -> tuple[KnowledgeFusionUnit, torch.Tensor, torch.Tensor]:
    student, teacher, target = small_problem()
    unit = small_unit(teacher, mode, seed=1, warmup_updates=2)
    unit.total_updates = 10  # let the cosine schedule (scheduler state) matter
    for _ in range(3):
        unit.learn(unit.fuse(student), target)
    return unit, student, target


def assert_same_from_now_on(a: KnowledgeFusionUnit, b: KnowledgeFusionUnit, student, target, steps: int = 2) -> None:
    for _ in range(steps):
        fa, fb = a.fuse(student), b.fuse(student)
        assert torch.equal(fa, fb)
        assert a.learn(fa, target) == b.learn(fb, target)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        assert a.lr == b.lr and a.updates == b.updates


@pytest.mark.parametrize("mode", ["gated", "replace"])
def test_state_dict_copies_a_unit_exactly(mode):
    """A second unit (built with another seed) loaded from state_dict() fuses and learns exactly like
    the first from then on: adapter, gate, AdamW moments, lr schedule and dropout seeds travel."""
    a, student, target = trained_unit(mode)
    b = small_unit(a.teacher, mode, seed=2, warmup_updates=2)
    b.load_state_dict(a.state_dict())
    assert_same_from_now_on(a, b, student, target)


def test_state_survives_torch_save_and_weights_only_load(tmp_path):
    """The state is plain tensors and containers: torch.save, then torch.load(weights_only=True)."""
    a, student, target = trained_unit()
    torch.save(a.state_dict(), tmp_path / "fusion.pt")
    b = small_unit(a.teacher, seed=2, warmup_updates=2)
    b.load_state_dict(torch.load(tmp_path / "fusion.pt", weights_only=True))
    assert_same_from_now_on(a, b, student, target)


@pytest.mark.parametrize("mode", ["gated", "replace"])
def test_a_unit_saved_between_fuse_and_learn_learns_the_same_after_loading(tmp_path, mode):
    """A server that saves after fusing and resumes later: the restored unit recomputes the pending
    fusion and its learn() equals the uninterrupted unit's."""
    a, student, target = trained_unit(mode)
    fused = a.fuse(student)
    torch.save(a.state_dict(), tmp_path / "fusion.pt")
    b = small_unit(a.teacher, mode, seed=2, warmup_updates=2)
    b.load_state_dict(torch.load(tmp_path / "fusion.pt", weights_only=True))
    assert a.learn(fused, target) == b.learn(fused, target)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert_same_from_now_on(a, b, student, target, steps=1)


@pytest.mark.parametrize("device", DEVICES)
def test_fusion_draws_its_dropout_from_its_own_seed_and_leaves_the_global_generator_alone(tmp_path, device):
    """Dropout is active in every fusion: its masks come from the unit's seeds, the same on every
    run and after a resume, and drawing them moves no generator anyone else uses."""
    student, teacher, target = small_problem()
    a, b = small_unit(teacher, device=device), small_unit(teacher, device=device)
    torch.manual_seed(123)
    expected_next = torch.rand(4, device=device)
    torch.manual_seed(123)
    fused = a.fuse(student)
    assert torch.equal(torch.rand(4, device=device), expected_next)
    assert torch.equal(b.fuse(student), fused)
    torch.save(a.state_dict(), tmp_path / "fusion.pt")
    resumed = small_unit(teacher, device=device, seed=5)
    resumed.load_state_dict(torch.load(tmp_path / "fusion.pt", weights_only=True))
    assert a.learn(fused, target) == resumed.learn(fused, target) == b.learn(fused, target)
    assert torch.equal(a.fuse(student), resumed.fuse(student))


def test_loading_a_state_for_another_teacher_shape_fails():
    """A fusion state is tied to its teacher matrix's shape (e.g. 100 vs 10 classes)."""
    a, _, _ = trained_unit()
    other = KnowledgeFusionUnit(torch.randn(12, 64), SMALL_STUDENT, AdapterConfig(h=2), device="cpu")
    with pytest.raises(ValueError, match="teacher"):
        other.load_state_dict(a.state_dict())
