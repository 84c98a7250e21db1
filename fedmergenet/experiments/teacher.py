"""Pretrain the ResNet50 teacher on the same data (and subset flags) as the experiment."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import RunConfig, validate
from ..data import make_loader
from ..flower.task import test_loader, train_set
from ..models import build_teacher
from ..teacher import save_teacher
from ..training import evaluate, make_optimizer, make_scheduler, pick_device, seed_everything, train_epoch


class WarmUp:
    """Linear learning-rate warm-up over the first epoch, as the CIFAR-100 training code of
    these models does: a ResNet50 from scratch is unstable at full rate in its first steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        self.optimizer = optimizer
        self.steps = max(1, steps)
        self.base = [group["lr"] for group in optimizer.param_groups]

    def __call__(self, step: int, _images: torch.Tensor, _labels: torch.Tensor) -> None:
        factor = min(1.0, (step + 1) / self.steps)
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * factor


def pretrain_teacher(cfg: RunConfig, path: Path | None = None, echo: bool = True) -> Path:
    """Train a ResNet50 for ``cfg.teacher_epochs`` epochs and save the checkpoint the server loads."""
    cfg = validate(cfg)
    path = Path(path or cfg.teacher_path())
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    dataset = train_set(cfg)
    loader = make_loader(dataset, None, cfg.batch_size, train=True, seed=cfg.seed, pin_memory=device.type == "cuda")
    model = build_teacher(num_classes=dataset.num_classes).to(device)
    optimizer = make_optimizer(model, cfg.teacher_lr, cfg.momentum, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.milestones, cfg.lr_gamma)
    warmup = WarmUp(optimizer, steps=len(loader))
    start = time.time()
    for epoch in range(1, cfg.teacher_epochs + 1):
        loss = train_epoch(model, loader, optimizer, device, desc=f"teacher epoch {epoch}/{cfg.teacher_epochs}",
                           before_step=warmup if epoch == 1 else None)
        scheduler.step()
        if echo:
            print(f"teacher epoch {epoch}/{cfg.teacher_epochs}: train loss {loss:.4f}", flush=True)
    result = evaluate(model, test_loader(cfg), device, desc="teacher eval")
    save_teacher(model.cpu(), path, dataset=cfg.dataset, epochs=cfg.teacher_epochs, test_top1=result.top1,
                 extra={"train_limit": cfg.train_limit, "seed": cfg.seed, "train_seconds": time.time() - start})
    if echo:
        print(f"teacher saved to {path} (test top-1 {100 * result.top1:.2f}%, {time.time() - start:.0f} s)", flush=True)
    return path


def ensure_teacher(cfg: RunConfig, echo: bool = True) -> Path:
    """The checkpoint the runs need: created when missing, and the user is told so."""
    path = cfg.teacher_path()
    if cfg.random_teacher or path.is_file():
        return path
    if echo:
        print(f"teacher checkpoint {path} is missing: pretraining it now ({cfg.teacher_epochs} epoch(s) "
              f"on {cfg.dataset})", flush=True)
    return pretrain_teacher(cfg, path, echo=echo)
