"""4: the GPU figures, on a machine with CUDA (``python -m benchmarks --cuda``): a client's
local epoch on full Fashion-MNIST at batch 32 and 128, evaluation, the fusion step, a
client's BatchNorm recalibration and how trainings side by side share the card (sharing.py),
each against its plain reference on the same card."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedmergenet.config import RunConfig, apply_preset
from fedmergenet.data.splits import client_data, test_loader
from fedmergenet.models import initial_student
from fedmergenet.training import evaluate, recalibrate_bn

from . import sharing
from .measure import Settings, client_throughput, fusion_step, interleaved, median, timed

CUDA = torch.device("cuda")


def training_config(settings: Settings, batch_size: int) -> RunConfig:
    """One client's partition of full Fashion-MNIST: 3 clients (18k images) at batch 128;
    9 (6k) at batch 32, where the eager references take several seconds an epoch."""
    clients = 9 if batch_size < 128 else 3
    return RunConfig(dataset="fashion-mnist", train_limit=2048 if settings.tiny else 0, test_limit=256,
                     num_clients=clients, batch_size=batch_size, lr=0.03, local_epochs=1, device="cuda")


def training(settings: Settings) -> dict[str, Any]:
    # --compile at the batch size of the presets that train on a GPU (one compilation, not two).
    return {str(batch): client_throughput(settings, CUDA, training_config(settings, batch), compiled=batch == 128)
            for batch in (32, 128)}


@torch.no_grad()
def plain_eval(model: nn.Module, loader) -> int:
    model.eval()
    seen = 0
    for images, labels in loader:
        model(images).argmax(1).eq(labels).sum()
        seen += len(labels)
    return seen


def evaluation(settings: Settings) -> dict[str, Any]:
    """The test set through ``evaluate`` (loss, top-1, top-5) against bare forwards of the same
    batches, at the default evaluation batch and a larger one; also ``evaluate`` in channels_last
    (the CPU's layout for forward passes)."""
    figures: dict[str, Any] = {}
    for batch in (RunConfig.eval_batch_size, 1024):
        cfg = RunConfig(dataset="fashion-mnist", test_limit=2048 if settings.tiny else 0, eval_batch_size=batch)
        model = initial_student(cfg).to(CUDA)
        loader = test_loader(cfg, CUDA)
        evaluate(model, loader, CUDA)  # warm-up, as the next line
        images = plain_eval(model, loader)
        # Ten times the repeats: a pass over the test set takes a fraction of a second.
        evaluate(model, loader, CUDA, memory_format=torch.channels_last)  # its own warm-up
        ours_s, plain_s, channels_last_s = interleaved(
            settings.repeats * 10, lambda: timed(lambda: evaluate(model, loader, CUDA)),
            lambda: timed(lambda: plain_eval(model, loader)),
            lambda: timed(lambda: evaluate(model, loader, CUDA, memory_format=torch.channels_last)))
        ours, plain = median(ours_s), median(plain_s)
        figures[str(batch)] = {"images": images, "ours_images_per_s": images / ours,
                               "plain_images_per_s": images / plain, "ratio": plain / ours, "samples": len(ours_s),
                               "ours_channels_last_images_per_s": images / median(channels_last_s)}
    return figures


def recalibration(settings: Settings) -> dict[str, Any]:
    """A client's BatchNorm recalibration on one partition (batch 128): torch's update_bn
    against ours over the same batches, eager and recorded (a CUDA graph replayed per batch in
    channels_last, the default on CUDA), recorded in the default layout, and over the first
    ``recalibrate-batches`` of the gpu preset, beside that client's training epoch (4a)."""
    cfg = training_config(settings, 128)
    batches = apply_preset("gpu").recalibrate_batches
    data = client_data(cfg, 0, cfg.num_clients, device=CUDA)
    loader = data.train
    model = initial_student(cfg).to(CUDA)
    variants = {"update_bn": lambda: torch.optim.swa_utils.update_bn(loader, model, CUDA),
                "ours_eager": lambda: recalibrate_bn(model, loader, CUDA, capture=False),
                "ours": lambda: recalibrate_bn(model, loader, CUDA),
                "ours_default_layout": lambda: recalibrate_bn(model, loader, CUDA,
                                                              memory_format=torch.contiguous_format),
                "ours_preset_eager": lambda: recalibrate_bn(model, loader, CUDA, max_batches=batches, capture=False),
                "ours_preset": lambda: recalibrate_bn(model, loader, CUDA, max_batches=batches)}
    for run in variants.values():
        run()  # warm-up
    seconds = interleaved(settings.repeats * 3, *(lambda run=run: timed(run) for run in variants.values()))
    return {"images": data.num_train, "preset_batches": batches,
            "batch_size": cfg.batch_size, "samples": len(seconds[0]),
            "seconds": {name: median(values) for name, values in zip(variants, seconds)}}


def measure(settings: Settings) -> dict[str, Any]:
    from tqdm import tqdm

    steps = {"training": lambda: training(settings), "evaluation": lambda: evaluation(settings),
             "fusion": lambda: fusion_step(settings, device="cuda"),
             "recalibration": lambda: recalibration(settings),
             "sharing": lambda: sharing.measure(count=40 if settings.tiny else 200)}
    return {name: step() for name, step in tqdm(steps.items(), desc="CUDA benchmarks", unit="figure")}
