"""Pretrain the ResNet50 teacher on the same data (and subset flags) as the experiment."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..checks import writable_dir
from ..config import RunConfig, validate
from ..data import make_loader
from ..data.splits import test_loader, train_set
from ..models import build_teacher
from ..teacher import save_teacher
from ..training import evaluate, make_optimizer, pick_device, seed_everything, train_epoch


class WarmupCosine:
    """Per-step learning rate: linear warm-up (a ResNet50 from scratch is unstable at full rate
    in its first steps), then cosine to zero, so even a one-epoch teacher ends annealed."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int) -> None:
        self.optimizer = optimizer
        self.total = max(1, steps_per_epoch * epochs)
        self.warmup = max(1, min(steps_per_epoch, self.total // 10))
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.step = 0

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / max(1, self.total - self.warmup)))

    def __call__(self, _batch: int, _images: torch.Tensor, _labels: torch.Tensor) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * self.factor(self.step)
        self.step += 1


def teacher_data_config(cfg: RunConfig) -> RunConfig:
    """The run's config with the teacher's share of the training set as its train_limit."""
    return cfg if cfg.teacher_train_limit < 0 else cfg.replace(train_limit=cfg.teacher_train_limit)


def pretrain_teacher(cfg: RunConfig, path: Path | None = None, echo: bool = True) -> Path:
    """Train a ResNet50 for ``cfg.teacher_epochs`` epochs and save the checkpoint the server loads."""
    cfg = validate(cfg)
    path = Path(path or cfg.teacher_path())
    writable_dir(path.parent, "teacher checkpoint folder")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    dataset = train_set(teacher_data_config(cfg))
    # One pass shows each image once: augmentation, a regulariser across epochs, would only slow it.
    loader = make_loader(dataset, None, cfg.batch_size, train=True, seed=cfg.seed, device=device,
                         augment=cfg.teacher_epochs > 1)
    model = build_teacher(num_classes=dataset.num_classes).to(device)
    optimizer = make_optimizer(model, cfg.teacher_lr, cfg.momentum, cfg.weight_decay)
    schedule = WarmupCosine(optimizer, steps_per_epoch=len(loader), epochs=cfg.teacher_epochs)
    start = time.time()
    for epoch in range(1, cfg.teacher_epochs + 1):
        loss = train_epoch(model, loader, optimizer, device, desc=f"teacher epoch {epoch}/{cfg.teacher_epochs}",
                           before_step=schedule)
        if echo:
            print(f"teacher epoch {epoch}/{cfg.teacher_epochs}: train loss {loss:.4f}", flush=True)
    result = evaluate(model, test_loader(cfg, device), device, desc="teacher eval")
    save_teacher(model.cpu(), path, dataset=cfg.dataset, epochs=cfg.teacher_epochs, test_top1=result.top1,
                 extra={"train_limit": len(dataset), "seed": cfg.seed, "train_seconds": time.time() - start})
    if echo:
        print(f"teacher saved to {path} (test top-1 {100 * result.top1:.2f}%, {time.time() - start:.0f} s)", flush=True)
    return path


def ensure_teacher(cfg: RunConfig, echo: bool = True) -> Path:
    """The checkpoint the runs need: created when missing, and the user is told so; left to
    the process pretraining it with --await-teacher (the run waits for it as it loads it)."""
    path = cfg.teacher_path()
    if not cfg.teacher_missing or cfg.await_teacher:
        return path
    if echo:
        print(f"teacher checkpoint {path} is missing: pretraining it now ({cfg.teacher_epochs} epoch(s) "
              f"on {cfg.dataset})", flush=True)
    return pretrain_teacher(cfg, path, echo=echo)
