"""The one training loop and the one evaluation loop.

Clients, the central baseline and teacher pretraining all call these, so a change to how a
model trains or is measured reaches every arm of a comparison at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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


def make_optimizer(model: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


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


def preferred_memory_format(device: torch.device) -> torch.memory_format:
    """channels_last trained MobileNetV2 1.23x faster on a 2-core CPU (BENCHMARKS.md, 1a).
    On CUDA it is unmeasured (its depthwise convolutions may not gain in fp32): default there."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


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
) -> float:
    """One pass over ``loader``; returns the mean training loss per example (the data's
    cross-entropy: a ``proximal`` term shapes the gradient but is not reported)."""
    memory_format = memory_format or preferred_memory_format(device)
    model.to(memory_format=memory_format)
    try:
        return _train_epoch(model, loader, optimizer, device, desc, before_step, after_step, progress, memory_format,
                            proximal)
    finally:
        # Weights leave in the ordinary layout: what travels and what is saved never depends on this.
        model.to(memory_format=torch.contiguous_format)


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
                 desc: str, before_step: BatchHook | None, after_step: BatchHook | None, progress: bool | None,
                 memory_format: torch.memory_format, proximal: Proximal | None) -> float:
    model.train()
    criterion = nn.CrossEntropyLoss()
    total_loss, total = 0.0, 0
    if progress is None:  # bars for people at a terminal, not for Ray actors' captured output
        progress = sys.stderr.isatty()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        if before_step is not None:
            before_step(step, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), labels)
        (loss + proximal(model) if proximal is not None else loss).backward()
        optimizer.step()
        if after_step is not None:
            after_step(step, images, labels)
        total_loss += loss.item() * labels.size(0)
        total += labels.size(0)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
    return total_loss / max(total, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval", progress: bool = False) -> EvalResult:
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct1, correct5, total = 0.0, 0, 0, 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        loss_sum += criterion(logits, labels).item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        total += labels.size(0)
    if total == 0:
        return EvalResult(loss=float("nan"), top1=0.0, top5=0.0, examples=0)
    return EvalResult(loss=loss_sum / total, top1=correct1 / total, top5=correct5 / total, examples=total)


def recalibrate_bn(model: nn.Module, loader: DataLoader, device: torch.device) -> None:
    """Recompute every BatchNorm's running statistics as exact averages over ``loader``
    (torch's update_bn from SWA, Izmailov et al. 2018): after weights are averaged, the
    averaged running statistics no longer describe the averaged model's activations."""
    torch.optim.swa_utils.update_bn(loader, model, device)


def bn_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running means and variances of every BatchNorm, by state_dict name, on the CPU."""
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()
            if name.endswith(("running_mean", "running_var"))}


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


def pick_device(requested: str) -> torch.device:
    """``cuda`` without a GPU falls back to the CPU with a warning rather than failing."""
    import warnings

    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        warnings.warn("--device cuda requested but no GPU is available; training on the CPU", stacklevel=2)
    return torch.device("cpu")
