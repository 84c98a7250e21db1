"""The one training loop and the one evaluation loop.

Clients, the central baseline and teacher pretraining all call these, so a change to how a
model trains or is measured reaches every arm of a comparison at once.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

# Called around each optimiser step with the batch index and the batch; the central
# MergeNet baseline fuses before a step and updates the adapter (and a co-trained teacher) after.
BatchHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class EvalResult:
    loss: float
    top1: float  # fraction in [0, 1]
    top5: float
    examples: int


@dataclass(frozen=True)
class Proximal:
    """FedProx's proximal term mu/2 * ||w - w_global||^2 (Li et al., 2020), anchored at the
    weights local training started from."""

    mu: float
    anchor: tuple[torch.Tensor, ...]

    @classmethod
    def at(cls, model: nn.Module, mu: float) -> Proximal:
        return cls(mu, tuple(p.detach().clone() for p in model.parameters()))

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return self.mu / 2 * sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), self.anchor))


class _WithoutCompilerWrappers(torch.optim.Optimizer):
    """An optimiser running torch's own code without the wrappers that import torch's compiler.

    torch wraps an optimiser's methods so that ``torch.compile`` leaves them alone, and each
    wrapper imports ``torch._dynamo`` on its first call: about a second in every fresh process
    that trains, which a deployment ClientApp is for every message. Nothing here compiles an
    optimiser (``--compile`` compiles the model), so that import is all the wrappers would add.
    Mixed in before a torch optimiser: ``class SGD(_WithoutCompilerWrappers, torch.optim.SGD)``."""

    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
    zero_grad = inspect.unwrap(torch.optim.Optimizer.zero_grad)
    state_dict = inspect.unwrap(torch.optim.Optimizer.state_dict)
    load_state_dict = inspect.unwrap(torch.optim.Optimizer.load_state_dict)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        torch_step = inspect.unwrap(super().step)
        # The rest of the step's wrapper: gradients off unless the optimiser is differentiable.
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return torch_step(self, closure)


class SGD(_WithoutCompilerWrappers, torch.optim.SGD):
    """``torch.optim.SGD``, step for step, without importing torch's compiler."""


class AdamW(_WithoutCompilerWrappers, torch.optim.AdamW):
    """``torch.optim.AdamW``, step for step, without importing torch's compiler."""


def make_optimizer(model: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    return SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, milestones: Iterable[int], gamma: float, start_epoch: int = 0
) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR positioned at ``start_epoch``: a client at global epoch e trains with the
    learning rate the central baseline uses at epoch e."""
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    for _ in range(start_epoch):
        optimizer.step()  # no gradients yet: a no-op that keeps the step order torch expects
        scheduler.step()
    return scheduler


# MobileNetV2 trains faster in channels_last on a 2-core CPU (BENCHMARKS.md, 1a), and on an H100
# its recorded step replays faster in it than in the default layout (README, Performance).
TRAINING_MEMORY_FORMAT = torch.channels_last


def forward_memory_format(device: torch.device, recorded: bool = False) -> torch.memory_format:
    """The layout of a forward-only pass (evaluation, BatchNorm recalibration). On a CPU
    channels_last, in which MobileNetV2's forward runs about 1.7x faster there (BENCHMARKS.md,
    1a). On a GPU channels_last too where the pass is ``recorded`` as a CUDA graph, as training's
    step is: a recorded recalibration replayed faster in it on an H200 (README, Performance).
    An eager pass on a GPU keeps the default layout: its eager forward of 256
    images already runs at the bare forward's speed in it (4b), and channels_last made the eager
    step slower there (4a)."""
    return torch.channels_last if device.type == "cpu" or recorded else torch.contiguous_format


def on_device(images: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """A batch of images on ``device``, in ``memory_format`` when it is a batch of 2-D images."""
    return images.to(device, non_blocking=True, memory_format=memory_format if images.dim() == 4 else torch.preserve_format)


@contextlib.contextmanager
def laid_out(model: nn.Module, memory_format: torch.memory_format) -> Iterator[nn.Module]:
    """``model`` in ``memory_format`` for the block. Its weights leave in the ordinary layout:
    what travels and what is saved never depends on how a pass ran."""
    model.to(memory_format=memory_format)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)


# Eager steps before the graph is recorded: the first creates the optimiser's momentum buffers
# and initialises cuBLAS and cuDNN, which a recording must find in place (PyTorch's CUDA graphs
# notes). Every further one is an eager step in an epoch that would otherwise replay it.
CAPTURE_WARMUP_STEPS = 1


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    desc: str = "train",
    before_step: BatchHook | None = None,
    after_step: BatchHook | None = None,
    progress: bool | None = None,
    memory_format: torch.memory_format | None = None,
    proximal: Proximal | None = None,
    capture: bool | None = None,
    compile_backend: str | None = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss per example (the data's
    cross-entropy: a ``proximal`` term shapes the gradient but is not reported).

    On CUDA every full batch after the first few replays one CUDA graph of the whole step
    (forward, backward, optimiser): the student is small enough that a GPU otherwise waits on
    Python launching its kernels. ``capture=False`` keeps the eager loop. Hooks still run
    eagerly between replays, but a recording freezes the optimiser's settings, so with hooks
    the step is recorded only if ``capture`` is True: the caller vouches that its hooks change
    tensors in place (``copy_`` into a weight) and never a setting such as the learning rate.

    ``compile_backend`` (see ``step_compiler``) runs full batches through ``torch.compile`` of
    the model, inside the recording on CUDA; a last partial batch stays eager, so a second
    batch shape never triggers a recompilation."""
    memory_format = memory_format or TRAINING_MEMORY_FORMAT
    hooked = before_step is not None or after_step is not None
    capture = device.type == "cuda" and (capture if capture is not None else not hooked)
    with laid_out(model, memory_format):
        return _train_epoch(model, loader, optimizer, device, desc, before_step, after_step, progress, memory_format,
                            proximal, capture, compile_backend)


class _Step:
    """One training step on a batch: forward, loss, backward, optimiser step; returns the
    batch's mean loss as a tensor (no host synchronisation)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, proximal: Proximal | None) -> None:
        self.model, self.optimizer, self.proximal = model, optimizer, proximal
        self.criterion = nn.CrossEntropyLoss()

    def loss_and_backward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(self.model(images), labels)
        (loss + self.proximal(self.model) if self.proximal is not None else loss).backward()
        return loss

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_and_backward(images, labels)
        self.optimizer.step()
        return loss.detach()


class _Recorded:
    """``run(*inputs)`` recorded once as a CUDA graph on static copies of its inputs, then replayed
    on new inputs of the same shapes, returning (a copy of) what ``run`` returned, if a tensor.
    Recording runs nothing: the inputs it is made from still need a replay. Recordings replay
    one at a time: every one is recorded on torch's one capture stream, and PyTorch keys
    cuBLAS's workspace by the stream (pytorch/pytorch#193402), so replays at once would share it."""

    def __init__(self, run: Callable[..., Any], *inputs: torch.Tensor) -> None:
        # A replay reads and writes the very memory ``run``'s tensors (weights, optimiser state)
        # had when recorded: holding ``run`` keeps them alive as long as the recording.
        self.run = run
        self.inputs = tuple(tensor.clone() for tensor in inputs)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = run(*self.inputs)

    def fits(self, *inputs: torch.Tensor) -> bool:
        return all(new.shape == static.shape for new, static in zip(inputs, self.inputs))

    def __call__(self, *inputs: torch.Tensor) -> Any:
        for static, new in zip(self.inputs, inputs):
            static.copy_(new)
        self.graph.replay()
        # The next replay overwrites the output.
        return self.output.clone() if isinstance(self.output, torch.Tensor) else None


class _CapturedStep(_Recorded):
    """The training step recorded once as a CUDA graph on a static batch and replayed. The
    learning rate is fixed in the recording, so a graph lives for one epoch (the schedule
    moves between epochs)."""

    def __init__(self, step: _Step, images: torch.Tensor, labels: torch.Tensor) -> None:
        step.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph

        def recorded(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            loss = step.loss_and_backward(images, labels).detach()
            step.optimizer.step()
            return loss

        super().__init__(recorded, images, labels)


def _on_side_stream(run: Callable[..., Any], images: torch.Tensor, *args: torch.Tensor) -> Any:
    """An eager warm-up step (or forward) on a side stream, as PyTorch requires before a capture."""
    side = torch.cuda.Stream(images.device)
    side.wait_stream(torch.cuda.current_stream(images.device))
    with torch.cuda.stream(side):
        result = run(images, *args)
    torch.cuda.current_stream(images.device).wait_stream(side)
    return result


class _Replay:
    """Runs a step on batch after batch the way a CUDA graph allows. With ``capture``, the first
    CAPTURE_WARMUP_STEPS batches run eagerly on a side stream, the next full batch is recorded
    (``record(run, *inputs)``, a ``_Recorded``) and every batch of its shapes replays that
    recording; a batch of other shapes (a last partial one) runs eagerly. Without, every batch
    runs eagerly."""

    def __init__(self, record: Callable[..., _Recorded], capture: bool) -> None:
        self.record, self.capture = record, capture
        self.recorded: _Recorded | None = None
        self.seen = 0

    def __call__(self, run: Callable[..., Any], *inputs: torch.Tensor, full: bool) -> Any:
        if self.capture and self.recorded is None and self.seen >= CAPTURE_WARMUP_STEPS and full:
            self.recorded = self.record(run, *inputs)
        self.seen += 1
        if self.recorded is not None and self.recorded.fits(*inputs):
            return self.recorded(*inputs)
        if self.capture and self.recorded is None:
            return _on_side_stream(run, *inputs)
        return run(*inputs)


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
                 desc: str, before_step: BatchHook | None, after_step: BatchHook | None, progress: bool | None,
                 memory_format: torch.memory_format, proximal: Proximal | None, capture: bool,
                 compile_backend: str | None) -> float:
    model.train()
    eager_step = _Step(model, optimizer, proximal)
    # Compiled code is cached per process on the model's class, not on this wrapper: a new model
    # of the same architecture (every round, every client) reuses it. Static shapes: a run has one
    # batch size, and a kernel for any batch size would be slower.
    full_step = (_Step(torch.compile(model, backend=compile_backend, dynamic=False), optimizer, proximal)
                 if compile_backend else eager_step)
    replay = _Replay(_CapturedStep, capture)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
    total, full_batch = 0, 0
    if progress is None:  # bars for people at a terminal, not for Ray actors' captured output
        progress = sys.stderr.isatty()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        images, labels = on_device(images, device, memory_format), labels.to(device, non_blocking=True)
        full_batch = full_batch or len(labels)
        if before_step is not None:
            before_step(step, images, labels)
        full = len(labels) == full_batch
        loss = replay(full_step if full else eager_step, images, labels, full=full)
        if after_step is not None:
            after_step(step, images, labels)
        total_loss += loss * labels.size(0)
        total += labels.size(0)
        if progress:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
    return float(total_loss) / max(total, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval", progress: bool = False,
             memory_format: torch.memory_format | None = None) -> EvalResult:
    """Loss, top-1 and top-5 over ``loader``; ``memory_format`` overrides the device's
    ``forward_memory_format`` (the benchmarks' references)."""
    memory_format = memory_format or forward_memory_format(device)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    # Summed on the device and read once: a GPU is never stopped to report a batch.
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    total = 0
    with laid_out(model, memory_format):
        for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            images, labels = on_device(images, device, memory_format), labels.to(device, non_blocking=True)
            logits = model(images)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            sums += torch.stack([criterion(logits, labels).double(), (top[:, 0] == labels).sum().double(),
                                 (top == labels[:, None]).any(dim=1).sum().double()])
            total += labels.size(0)
    if total == 0:
        return EvalResult(loss=float("nan"), top1=0.0, top5=0.0, examples=0)
    loss_sum, correct1, correct5 = sums.tolist()
    return EvalResult(loss=loss_sum / total, top1=correct1 / total, top5=correct5 / total, examples=total)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, device: torch.device, max_batches: int = 0,
                   capture: bool | None = None, memory_format: torch.memory_format | None = None) -> None:
    """Recompute every BatchNorm's running statistics as exact averages over ``loader``'s
    batches (its first ``max_batches`` when > 0), as torch's ``update_bn`` from SWA (Izmailov
    et al. 2018) does: after weights are averaged, the averaged running statistics no longer
    describe the averaged model's activations.

    ``update_bn`` gets the average from momentum None, for which every BatchNorm reads its batch
    counter back from the device (1 / num_batches_tracked) on every batch: a GPU waits on the host
    once per layer per batch. Here each batch runs at momentum 1, so that its own moments replace
    the running ones, and they are summed on the device; their mean over the k batches is the
    same average (update_bn's momentum 1 / k at batch k), with nothing set from the host between
    batches. So on CUDA (``capture`` None or True) every full batch after the first replays one
    CUDA graph of the forward pass and the sums, as training replays its step. The pass runs in
    ``forward_memory_format`` for the device and whether it is recorded, unless ``memory_format``
    says otherwise."""
    capture = device.type == "cuda" if capture is None else capture
    memory_format = memory_format or forward_memory_format(device, recorded=capture)
    with each_batch_sets_statistics(model) as norms:
        if not norms:
            return
        for bn in norms:
            bn.reset_running_stats()
        statistics = [t for bn in norms for t in (bn.running_mean, bn.running_var)]
        sums = [torch.zeros_like(t) for t in statistics]
        batches = itertools.islice(loader, max_batches) if max_batches > 0 else loader
        with laid_out(model, memory_format):
            count = _summed_statistics(model, batches, device, statistics, sums, capture, memory_format)
        if count:
            torch._foreach_div_(sums, float(count))
            for tensor, total in zip(statistics, sums):
                tensor.copy_(total)


@contextlib.contextmanager
def each_batch_sets_statistics(model: nn.Module) -> Iterator[list[nn.modules.batchnorm._BatchNorm]]:
    """The model in training mode with every BatchNorm that tracks running statistics at
    momentum 1, so that after a forward pass they hold that batch's own; yields those
    BatchNorms, and restores their momenta and the model's mode after."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in norms]
    was_training = model.training
    try:
        for bn in norms:
            bn.momentum = 1.0
        model.train()
        yield norms
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.train(was_training)


def _summed_statistics(model: nn.Module, batches: Iterable, device: torch.device, statistics: list[torch.Tensor],
                       sums: list[torch.Tensor], capture: bool, memory_format: torch.memory_format) -> int:
    """Adds each batch's BatchNorm moments into ``sums``; returns the number of batches."""
    def forward(images: torch.Tensor) -> None:
        model(images)
        torch._foreach_add_(sums, statistics)

    replay = _Replay(_Recorded, capture)
    full_batch = 0
    for batch in batches:
        images = on_device(batch[0] if isinstance(batch, (list, tuple)) else batch, device, memory_format)
        full_batch = full_batch or len(images)
        replay(forward, images, full=len(images) == full_batch)
    return replay.seen


def bn_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running means and variances of every BatchNorm, by state_dict name, on the CPU."""
    statistics = {name: tensor.detach() for name, tensor in model.state_dict().items()
                  if name.endswith(("running_mean", "running_var"))}
    return {name: tensor.clone() for name, tensor in moved(statistics, "cpu").items()}


def moved(state: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """``state`` on ``device``, in one copy per dtype: views into one buffer per dtype, to load or
    send, not to train in place. Moved one by one, the student's 373 tensors are as many
    transfers, each waiting for the card, and on a card other processes share (a suite's arms,
    Ray's actors) each waits for its turn. Already there, ``state`` is returned as it is."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # as tensors there name it
    if all(tensor.device == device for tensor in state.values()):
        return state
    names: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for name, tensor in state.items():
        names.setdefault((tensor.dtype, tensor.device), []).append(name)
    out: dict[str, torch.Tensor] = {}
    for group in names.values():
        flat = torch.cat([state[name].detach().reshape(-1) for name in group]).to(device)
        for name, piece in zip(group, flat.split([state[name].numel() for name in group])):
            out[name] = piece.view(state[name].shape)
    return {name: out[name] for name in state}


def pool_bn_statistics(stats: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Statistics of the union of the clients' data from each client's: weighted means, and
    variances pooled with the spread of the clients' means (E[x^2] - E[x]^2)."""
    total = float(sum(weights))
    pooled: dict[str, torch.Tensor] = {}
    for name in stats[0]:
        if not name.endswith("running_mean"):
            continue
        prefix = name[: -len("running_mean")]
        means = [s[name].double() for s in stats]
        variances = [s[prefix + "running_var"].double() for s in stats]
        mean = sum(w * m for w, m in zip(weights, means)) / total
        second = sum(w * (v + m * m) for w, v, m in zip(weights, variances, means)) / total
        pooled[name] = mean.to(stats[0][name].dtype)
        pooled[prefix + "running_var"] = (second - mean * mean).clamp_min(0).to(stats[0][name].dtype)
    return pooled


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_compiler(compile_step: bool, device: torch.device) -> str | None:
    """The ``torch.compile`` backend of the student's training step: Inductor on CUDA when a run
    asks for it (``--compile``). On the CPU the eager channels_last step stays: Inductor there
    needs a C++ toolchain and compiles for minutes on few cores."""
    return "inductor" if compile_step and device.type == "cuda" else None


def pick_device(requested: str) -> torch.device:
    """``cuda`` without a GPU falls back to the CPU with a warning rather than failing."""
    import warnings

    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        warnings.warn("--device cuda requested but no GPU is available; training on the CPU", stacklevel=2)
    return torch.device("cpu")
