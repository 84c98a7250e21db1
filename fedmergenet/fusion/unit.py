"""The knowledge fusion unit: the one object that owns the frozen teacher matrix, the
adapter, its optimiser and its schedule.

``fuse(student_layer)`` writes teacher knowledge into a student layer; ``learn(fused,
observed)`` is MergeNet's hypernetwork update: the adapter's output is pulled toward where
training then took that layer (gradients with ``grad_outputs = fused - observed``).

Scale safety: the adapter ends in a LayerNorm, so its raw output has unit-scale entries
while the layer it replaces has entries around 0.05. The default ``gated`` mode writes
``student + gate * std(student) * adapter(...)`` with a zero-initialised learnable gate, so
the first fusion is the identity and the adapter's effect grows only as far as learning
pulls it; ``replace`` writes the adapter's output itself (the original MergeNet).

Either way the fused layer is then rescaled to the Frobenius norm of the layer it came
from. Without that, fusing every batch compounds: with |gate| near 1 each fusion grows the
layer's scale by about sqrt(1 + gate^2), the BatchNorm behind the layer hides it, and the
layer overflows after a few thousand fusions (README, "How fusion works here", has the measurement).
With it the layer's scale moves only as training moves it. A fusion whose output is not
finite is refused (``fuse`` returns None) and so is an update whose gradient is not.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import AdapterConfig
from ..training import AdamW, pick_device
from .param_attention import ParamAttention, as_matrix


GATE_LR_SCALE = 10.0


def clip_gradients_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2, scale by max_norm / (norm + 1e-6) when above) on
    gradients of one device and dtype, without its per-call grouping: the adapter's update is
    bound by Python, not arithmetic. Returns the total norm before clipping, as a tensor."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    return pick_device(device or "auto")


@dataclass
class _Pending:
    """The last fusion, kept until learn(): its input, dropout seed and (live) output."""

    student: torch.Tensor
    seed: int
    output: torch.Tensor | None = None


class KnowledgeFusionUnit:
    def __init__(
        self,
        teacher_matrix: torch.Tensor,
        student_shape: tuple[int, ...],
        config: AdapterConfig | None = None,
        total_updates: int = 100,
        device: str | torch.device | None = "auto",
        seed: int = 0,
    ) -> None:
        self.config = config or AdapterConfig()
        if self.config.mode not in ("gated", "replace"):
            raise ValueError(f"unknown fusion mode {self.config.mode!r}")
        self.device = resolve_device(device)
        self.student_shape = tuple(student_shape)
        matrix_shape = (self.student_shape[0], math.prod(self.student_shape[1:]))
        # The teacher is frozen: a detached copy nobody can train.
        self.teacher = as_matrix(teacher_matrix).detach().to(self.device, torch.float32).clone()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.adapter = ParamAttention(matrix_shape, tuple(self.teacher.shape), self.config.h, self.config.num_layers)
        self.adapter.to(self.device)
        self.adapter.train()  # MergeNet fuses with dropout active
        self.gate = nn.Parameter(torch.zeros((), device=self.device))
        # The adapter's step is bound by Python launching small kernels, not by arithmetic, so
        # per-call bookkeeping (module walks, seeding every generator, host reads) shows in
        # its cost: the parameter list is built once and each call reads the device once.
        self._params = list(self.adapter.parameters()) + ([self.gate] if self.config.mode == "gated" else [])
        self.total_updates = max(1, int(total_updates))
        # fused: one kernel per parameter group, on the CPU too (torch's default there loops over
        # the tensors one op at a time, which dominates a small adapter's update).
        self.optimizer = AdamW(self._param_groups(), lr=self.config.lr, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.updates = 0
        self._seeds = random.Random(seed)
        self._pending: _Pending | None = None
        self.last_shift: float | None = None

    # --- public API ------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return list(self._params)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def fuse(self, student_layer: torch.Tensor) -> torch.Tensor | None:
        """The fused layer (same shape, dtype and device as the input), or None when the
        adapter's output is not finite: the caller keeps its layer and counts a skipped fusion."""
        if tuple(student_layer.shape) != self.student_shape:
            raise ValueError(f"student layer has shape {tuple(student_layer.shape)}, expected {self.student_shape}")
        # A copy: the caller may keep training the tensor it passed, which the graph must not see.
        student = as_matrix(student_layer).detach().to(self.device, torch.float32, copy=True)
        pending = _Pending(student=student, seed=self._seeds.randrange(2**31))
        pending.output = self._forward(pending)
        output = pending.output.detach()
        # How far this fusion moves the layer, relative to its norm (0 is the identity), read
        # from the device together with the finiteness check: one synchronisation, not two.
        shift = (output - student).norm() / student.norm().clamp_min(1e-12)
        finite, shift = torch.stack([torch.isfinite(output).all().float(), shift]).tolist()
        if not finite:
            self._pending = None
            return None
        self._pending = pending
        self.last_shift = shift
        return pending.output.detach().reshape(student_layer.shape).to(student_layer.device, student_layer.dtype)

    def learn(self, fused_layer: torch.Tensor, observed_layer: torch.Tensor) -> float | None:
        """One hypernetwork update toward ``observed_layer``; returns the mean squared gap, or
        None when the update was refused (the observed layer or the gradient is not finite).

        ``fused_layer`` must be what the last ``fuse()`` returned: it is the output whose
        graph carries the gradient to the adapter.
        """
        pending = self._pending
        if pending is None:
            raise RuntimeError("learn() needs a fuse() first")
        output = pending.output if pending.output is not None else self._forward(pending, recompute=True)
        fused = as_matrix(fused_layer).to(self.device, torch.float32)
        observed = as_matrix(observed_layer).detach().to(self.device, torch.float32)
        target = output.detach()
        delta = target - observed
        params = self._params
        # The graph is kept until the checks below are read: a refused call leaves fuse()'s
        # output learnable (the unit drops it, and with it the graph, once it is used).
        grads = torch.autograd.grad([output], params, grad_outputs=[delta], allow_unused=True, retain_graph=True)
        for param, grad in zip(params, grads):
            param.grad = grad  # every gradient replaced: no zero_grad() needed before
        # The total norm is not finite exactly when some gradient is not (or overflows).
        norm = clip_gradients_([grad for grad in grads if grad is not None], self.config.clip_norm)
        # One host read for every check (each read stops a GPU): torch.allclose(fused, target,
        # rtol=1e-4, atol=1e-5), the observed layer's finiteness, the gradient's norm, the gap.
        gap = (fused - target).abs()
        matches, largest, finite, norm, mse = torch.stack([
            (gap <= 1e-5 + 1e-4 * target.abs()).all().float(), gap.max(), torch.isfinite(observed).all().float(),
            norm.float(), delta.pow(2).mean()]).tolist()
        if not matches:
            self.optimizer.zero_grad(set_to_none=True)
            raise ValueError(f"learn() got a fused layer that is not the output of the last fuse() "
                             f"(largest difference {largest:.3g})")
        self._pending = None
        if not finite or not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.updates += 1
        return mse

    def set_teacher(self, teacher_matrix: torch.Tensor) -> None:
        """A co-trained teacher (the original baseline's option) moves; the adapter follows it."""
        matrix = as_matrix(teacher_matrix).detach().to(self.device, torch.float32)
        if matrix.shape != self.teacher.shape:
            raise ValueError(f"teacher matrix has shape {tuple(matrix.shape)}, expected {tuple(self.teacher.shape)}")
        self.teacher = matrix.clone()

    @property
    def gate_value(self) -> float | None:
        return float(self.gate.detach()) if self.config.mode == "gated" else None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        pending = None
        if self._pending is not None:
            pending = {"student": self._pending.student.cpu(), "seed": self._pending.seed}
        return {
            "adapter": self.adapter.state_dict(),
            "gate": self.gate.detach().cpu(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "updates": self.updates,
            "total_updates": self.total_updates,
            "config": asdict(self.config),
            "seeds": list(self._seeds.getstate()[1]),
            "seeds_version": self._seeds.getstate()[0],
            "seeds_gauss": self._seeds.getstate()[2],
            "pending": pending,
            "teacher_shape": list(self.teacher.shape),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["teacher_shape"]) != list(self.teacher.shape):
            raise ValueError(f"fusion state is for a teacher of shape {state['teacher_shape']}")
        self.adapter.load_state_dict(state["adapter"])
        with torch.no_grad():
            self.gate.copy_(state["gate"].to(self.device))
        # torch's Optimizer.load_state_dict keeps the given moment tensors (no copy): a deep
        # copy stops two units loaded from one live state from stepping each other's moments.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.updates = int(state["updates"])
        self.total_updates = int(state["total_updates"])
        self._seeds.setstate((state["seeds_version"], tuple(state["seeds"]), state["seeds_gauss"]))
        pending = state.get("pending")
        self._pending = None
        if pending is not None:
            # The graph is not saved: learn() recomputes the output from the same input and seed.
            self._pending = _Pending(student=pending["student"].to(self.device), seed=int(pending["seed"]))

    # --- internals ---------------------------------------------------------------------
    def _forward(self, pending: _Pending, recompute: bool = False) -> torch.Tensor:
        """The adapter's output, with dropout drawn from the fusion's own seed (reproducible)."""
        with self._dropout_seeded(pending.seed), self._power_iteration_frozen(recompute):
            raw = self.adapter(pending.student, self.teacher)
        student = pending.student
        if self.config.mode == "replace":
            fused = raw
        else:
            # std of the input is a constant of this fusion, not something to learn through.
            fused = student + self.gate * student.std() * raw
        # The norm-preserving rescale is what keeps repeated fusion from compounding (see top).
        return fused * (student.norm() / fused.norm().clamp_min(torch.finfo(fused.dtype).tiny))

    @contextlib.contextmanager
    def _dropout_seeded(self, seed: int) -> Iterator[None]:
        """Dropout draws from the generator of the adapter's device alone: that one is seeded
        for the call and restored after, as torch.random.fork_rng + manual_seed would, without
        seeding every device's generator on each fusion."""
        if self.device.type == "cuda":
            generator = torch.cuda.default_generators[self.device.index if self.device.index is not None
                                                      else torch.cuda.current_device()]
        else:
            generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            yield
        finally:
            generator.set_state(state)

    @contextlib.contextmanager
    def _power_iteration_frozen(self, frozen: bool) -> Iterator[None]:
        """fuse() already ran spectral norm's power iteration and saved its vectors; a recompute
        must reuse them (another iteration would give a different output): eval mode of the
        norm only, for that one forward."""
        norms = [module.parametrizations for module in self.adapter.modules()
                 if parametrize.is_parametrized(module)] if frozen else []
        for norm in norms:
            norm.eval()
        try:
            yield
        finally:
            for norm in norms:
                norm.train()

    def _param_groups(self) -> list[dict[str, Any]]:
        # As MergeNet: no weight decay on biases and norms (nor on the gate).
        decay, no_decay = [], []
        for name, param in self.adapter.named_parameters():
            (no_decay if ("bias" in name or "norm" in name) else decay).append(param)
        return [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": [self.gate], "weight_decay": 0.0, "lr": self._gate_lr()},
        ]

    def _gate_lr(self) -> float:
        """A lone scalar moves about one lr per Adam step, so this rate lets the gate travel up to
        about 0.5 over the run however few the updates (a federated run learns once per round),
        and never slower than 10x the adapter's rate (a central run learns on every fused batch)."""
        return max(self.config.lr * GATE_LR_SCALE, 0.5 / self.total_updates)

    def _lr_factor(self, step: int) -> float:
        """Constant during warm-up, then cosine to zero over the remaining updates (MergeNet)."""
        warmup = self.config.warmup_updates
        if step < warmup:
            return 1.0
        span = max(1, self.total_updates - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))
