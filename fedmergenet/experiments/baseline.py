"""The single-machine baselines: plain MobileNetV2, and MergeNet's original ``run_res50_mbv2``
semantics (fuse from the ResNet50 every ``f`` batches, hypernetwork update after each fused
step), trained on the union of the clients' training data with the clients' optimiser and
LR schedule, for the same number of epochs over the data as the federated runs."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic import save_torch
from ..checks import check_run
from ..config import RunConfig
from ..data import make_loader, split_train_val
from ..data.splits import client_partitions, test_loader, train_set
from ..fusion import KnowledgeFusionUnit
from ..models import STUDENT_LAYER, TEACHER_LAYER, initial_student
from ..results import append_metrics, metrics_row, read_metrics, summarize, write_summary
from ..teacher import teacher_for_run
from ..training import (evaluate, make_optimizer, make_scheduler, pick_device, seed_everything, step_compiler,
                        train_epoch)


def union_of_client_data(cfg: RunConfig) -> np.ndarray:
    """Exactly the images the clients train on (their local validation splits excluded)."""
    parts = client_partitions(cfg)
    train_parts = [split_train_val(idx, cfg.val_fraction, seed=cfg.seed + i)[0] for i, idx in enumerate(parts)]
    return np.sort(np.concatenate(train_parts))


@dataclass
class FusionHooks:
    """Fuse before every f-th step; after that step, pull the adapter toward where SGD took the layer."""

    unit: KnowledgeFusionUnit
    layer: torch.nn.Parameter
    every: int
    teacher: torch.nn.Module | None = None  # set when the teacher is co-trained
    teacher_optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    fused: torch.Tensor | None = None
    epoch_fusions: int = 0
    epoch_skipped: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    epoch_shifts: list[float] = field(default_factory=list)

    def before(self, _batch: int, _images: torch.Tensor, _labels: torch.Tensor) -> None:
        if self.step % self.every == 0:
            self.fused = self.unit.fuse(self.layer.detach())
            if self.fused is None:
                self.epoch_skipped += 1
                warnings.warn(f"step {self.step}: fusion skipped, the adapter's output is not finite; "
                              "the layer is kept", stacklevel=2)
                return
            with torch.no_grad():
                self.layer.copy_(self.fused)
            self.epoch_fusions += 1
            self.epoch_shifts.append(self.unit.last_shift)

    def after(self, _batch: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.teacher is not None and self.teacher_optimizer is not None:
            self._train_teacher(images, labels)
        if self.fused is not None:
            loss = self.unit.learn(self.fused, self.layer.detach())
            if loss is None:
                self.epoch_skipped += 1
                warnings.warn(f"step {self.step}: adapter update skipped, its gradient or the layer is not finite",
                              stacklevel=2)
            else:
                self.epoch_losses.append(loss)
            self.fused = None
        self.step += 1

    def _train_teacher(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.teacher.train()
        self.teacher_optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(self.teacher(images), labels).backward()
        self.teacher_optimizer.step()
        self.unit.set_teacher(self.teacher.state_dict()[TEACHER_LAYER])

    def end_epoch(self) -> dict:
        """This epoch's fusion counts for its metrics row, then reset."""
        row = {
            "fusion_applied": self.epoch_fusions,
            "fusion_skipped": self.epoch_skipped,
            "adapter_loss": float(np.mean(self.epoch_losses)) if self.epoch_losses else None,
            "fusion_shift": float(np.mean(self.epoch_shifts)) if self.epoch_shifts else None,
            "gate": self.unit.gate_value,
            "layer_std": float(self.layer.detach().std()),
        }
        self.epoch_fusions, self.epoch_skipped, self.epoch_losses, self.epoch_shifts = 0, 0, [], []
        return row


def run_central(cfg: RunConfig, mergenet: bool, cotrain_teacher: bool = False, echo: bool = True) -> Path:
    arm = cfg.central_arm if mergenet else "central"
    out = Path(cfg.output_dir or f"results/{arm}")
    cfg = check_run(cfg.replace(fusion=mergenet), out, teacher=mergenet)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    dataset = train_set(cfg)
    indices = union_of_client_data(cfg)
    loader = make_loader(dataset, indices, cfg.batch_size, train=True, seed=cfg.seed, device=device)
    tests = test_loader(cfg, device)
    model = initial_student(cfg).to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.milestones(), cfg.lr_gamma)
    epochs = cfg.total_epochs  # the federated arms' budget of passes over the data
    hooks, teacher_info = None, None
    if mergenet:
        hooks, teacher_info = _fusion_hooks(cfg, model, dataset.num_classes, epochs * len(loader), cotrain_teacher, device)
    start = time.time()
    append_metrics(out, _row(0, evaluate(model, tests, device), {}, time.time() - start))
    for epoch in range(1, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        # capture: the fusion hooks write the layer in place, which a recorded step reads as it replays.
        loss = train_epoch(model, loader, optimizer, device, desc=f"{arm} epoch {epoch}/{epochs}",
                           before_step=hooks.before if hooks else None, after_step=hooks.after if hooks else None,
                           capture=True, compile_backend=step_compiler(cfg.compile, device))
        scheduler.step()
        fusion = hooks.end_epoch() if hooks else {}
        result = evaluate(model, tests, device)
        append_metrics(out, {**_row(epoch, result, fusion, time.time() - start), "train_loss": loss,
                             "lr": lr})
        if echo:
            print(f"{arm} epoch {epoch}/{epochs}: train loss {loss:.4f}, test top-1 {100 * result.top1:.2f}%", flush=True)
    save_torch(out / "final_model.pt", model.cpu().state_dict())
    write_summary(out, _summary(cfg, arm, out, time.time() - start, teacher_info, cotrain_teacher, len(indices)))
    return out


def _fusion_hooks(cfg: RunConfig, model: torch.nn.Module, num_classes: int, total_steps: int, cotrain: bool,
                  device: torch.device) -> tuple[FusionHooks, dict]:
    teacher, info = teacher_for_run(path=cfg.teacher_path(), dataset=cfg.dataset, num_classes=num_classes,
                                    random=cfg.random_teacher, placebo=cfg.placebo_teacher, seed=cfg.seed,
                                    wait=cfg.await_teacher)
    layer = dict(model.named_parameters())[STUDENT_LAYER]
    unit = KnowledgeFusionUnit(teacher.state_dict()[TEACHER_LAYER], tuple(layer.shape), cfg.adapter(),
                               total_updates=max(1, total_steps // cfg.fusion_batches), device=cfg.server_device,
                               seed=cfg.seed)
    hooks = FusionHooks(unit=unit, layer=layer, every=cfg.fusion_batches)
    if cotrain:
        for param in teacher.parameters():
            param.requires_grad_(True)
        hooks.teacher = teacher.to(device)
        hooks.teacher_optimizer = make_optimizer(teacher, cfg.lr, cfg.momentum, cfg.weight_decay)
    return hooks, {**info.as_dict(), "cotrained": cotrain}


def _row(epoch: int, result, fusion: dict, wall: float) -> dict:
    return metrics_row(epoch_equiv=epoch, top1=result.top1, top5=result.top5, loss=result.loss, wall_time_s=wall,
                       epoch=epoch, **fusion)


def _summary(cfg: RunConfig, arm: str, out: Path, wall: float, teacher: dict | None, cotrain: bool, images: int) -> dict:
    rows = read_metrics(out)
    return summarize(rows, arm=arm, status="completed", wall_time_s=wall, teacher=teacher,
                     config={**cfg.to_run_config(), "fusion": arm != "central"},
                     epochs=rows[-1]["epoch"], train_images=images, cotrain_teacher=cotrain)
