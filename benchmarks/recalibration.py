"""How many batches BatchNorm recalibration needs (``--recalibrate-batches``), measured:

    python -m benchmarks.recalibration [--tiny] [--rounds 6] [--alpha A] [--out benchmarks/recalibration.json]

A FedAvg global model is trained on the CPU (3 clients, a few rounds on a subset of
Fashion-MNIST; the clients' averaged BatchNorm statistics are what plain FedAvg keeps). Then
every client passes its whole training split of full Fashion-MNIST through the model once, as
``recalibrate_bn`` does (the seed-0 batches, augmented, batch 128), and the statistics of every
batch are kept. A recalibration on the first N batches is the average over N of them: each
window of N consecutive batches (the loader shuffles) is one independent draw, so the spread over
windows is the spread a round's recalibration would have. Each variant's pooled statistics
(pool_bn_statistics, as the server pools them) go into the model, which is evaluated on the
10,000 test images. Results are data: the JSON that the README's table is read from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fedmergenet.config import PROJECT_ROOT, RunConfig
from fedmergenet.data.splits import client_data, test_loader
from fedmergenet.flower.client_app import local_train
from fedmergenet.models import initial_student
from fedmergenet.training import (bn_statistics, each_batch_sets_statistics, evaluate, forward_memory_format, laid_out,
                                  on_device, pool_bn_statistics)

CPU = torch.device("cpu")
DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "recalibration.json"
BATCH_COUNTS = (2, 4, 8, 16, 32, 64)
MAX_WINDOWS = 4  # draws per batch count: enough for a spread, at one test-set pass each


def configs(tiny: bool, rounds: int, alpha: float = 0.0) -> tuple[RunConfig, RunConfig]:
    """The training run (a subset, so the CPU trains it in minutes) and the recalibration's data
    (the gpu preset's: full Fashion-MNIST, 3 clients, batch 128), both label-skewed by a
    Dirichlet ``alpha`` when it is > 0."""
    full = RunConfig(dataset="fashion-mnist", train_limit=1536 if tiny else 0, test_limit=512 if tiny else 0,
                     num_clients=3, batch_size=64 if tiny else 128, alpha=alpha, device="cpu")
    # The default milestones anneal the learning rate: the model studied is an endpoint, as a run's is.
    training = full.replace(train_limit=384 if tiny else 9600, rounds=rounds, local_epochs=1, lr=0.05)
    return training, full


def fedavg_model(cfg: RunConfig) -> nn.Module:
    """``cfg.rounds`` rounds of FedAvg over the real client loop; weights and BatchNorm buffers
    averaged by examples, as FedAvg averages every array."""
    model = initial_student(cfg)
    for server_round in tqdm(range(1, cfg.rounds + 1), desc="FedAvg rounds", leave=False):
        states, weights = [], []
        for client in range(cfg.num_clients):
            local = initial_student(cfg)
            local.load_state_dict(model.state_dict())
            _, examples = local_train(cfg, local, client, cfg.num_clients, server_round, CPU)
            states.append(local.state_dict())
            weights.append(examples)
        total = sum(weights)
        model.load_state_dict({name: (sum(w * s[name].double() for w, s in zip(weights, states)) / total)
                               .to(tensor.dtype) for name, tensor in states[0].items()})
    return model


@torch.no_grad()
def batch_statistics(model: nn.Module, loader) -> list[dict[str, torch.Tensor]]:
    """Every batch's own BatchNorm statistics (momentum 1: the running values are the batch's),
    from forward passes in the layout recalibrate_bn uses on a CPU."""
    memory_format = forward_memory_format(CPU)
    per_batch = []
    with each_batch_sets_statistics(model), laid_out(model, memory_format):
        for images, _ in tqdm(loader, desc="batches", leave=False):
            model(on_device(images, CPU, memory_format))
            per_batch.append(bn_statistics(model))
    return per_batch


def averaged(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """update_bn's result over these batches: the plain mean of each batch's statistics."""
    return {name: torch.stack([b[name] for b in batches]).mean(0) for name in batches[0]}


def relative_error(stats: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Median over the BatchNorm tensors of ||stats - reference|| / ||reference||."""
    return statistics.median(float((stats[n] - reference[n]).norm() / reference[n].norm().clamp_min(1e-12))
                             for n in reference)


def evaluated(model: nn.Module, stats: dict[str, torch.Tensor], loader) -> dict[str, float]:
    model.load_state_dict(stats, strict=False)
    result = evaluate(model, loader, CPU)
    return {"top1": result.top1, "loss": result.loss}


def study(tiny: bool, rounds: int, alpha: float = 0.0) -> dict[str, Any]:
    training_cfg, cfg = configs(tiny, rounds, alpha)
    start = time.perf_counter()
    model = fedavg_model(training_cfg)
    train_s = time.perf_counter() - start
    averaged_stats = bn_statistics(model)  # plain FedAvg's statistics: the clients' averaged ones
    data = [client_data(cfg, client, cfg.num_clients) for client in range(cfg.num_clients)]
    per_client = [batch_statistics(model, d.train) for d in data]
    weights = [float(d.num_train) for d in data]
    test = test_loader(cfg)
    whole = pool_bn_statistics([averaged(batches) for batches in per_client], weights)
    return {
        "without_recalibration": evaluated(model, averaged_stats, test),
        "whole_split": evaluated(model, whole, test) | {"batches": min(len(b) for b in per_client),
                                                        "batches_per_client": [len(b) for b in per_client]},
        "by_batches": {str(n): row | {"images_per_client": n * cfg.batch_size}
                       for n, row in by_batch_count(model, per_client, weights, whole, test).items()},
        "setting": {
            "training": {"train_limit": training_cfg.train_limit, "rounds": training_cfg.rounds,
                         "lr": training_cfg.lr, "seconds": train_s},
            "recalibration": {"dataset": cfg.dataset, "clients": cfg.num_clients, "alpha": cfg.alpha or None,
                              "batch_size": cfg.batch_size,
                              "images_per_client": [d.num_train for d in data], "test_images": len(test.dataset)},
            "tiny": tiny,
        },
    }


def by_batch_count(model: nn.Module, per_client: list[list[dict[str, torch.Tensor]]], weights: list[float],
                   whole: dict[str, torch.Tensor], test) -> dict[int, dict[str, Any]]:
    """For each batch count N below the shortest split: up to MAX_WINDOWS draws of N consecutive
    batches per client, each pooled, evaluated and compared with the whole split's statistics."""
    shortest = min(len(batches) for batches in per_client)
    rows = {}
    for n in tqdm([n for n in BATCH_COUNTS if n < shortest], desc="batch counts", leave=False):
        draws = []
        for window in range(min(MAX_WINDOWS, shortest // n)):
            pooled = pool_bn_statistics([averaged(b[window * n:(window + 1) * n]) for b in per_client], weights)
            draws.append(evaluated(model, pooled, test) | {"stat_error": relative_error(pooled, whole)})
        rows[n] = {
            "draws": draws,
            "top1_mean": statistics.fmean(d["top1"] for d in draws),
            "top1_min": min(d["top1"] for d in draws),
            "top1_max": max(d["top1"] for d in draws),
            "stat_error_median": statistics.median(d["stat_error"] for d in draws),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recalibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rounds", type=int, default=6, help="FedAvg rounds that train the model studied")
    parser.add_argument("--alpha", type=float, default=0.0,
                        help="Dirichlet label skew of the clients' partitions (> 0); IID when left out")
    parser.add_argument("--tiny", action="store_true", help="smallest settings: proves the study runs")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        print(f"error: --rounds must be at least 1 (got {args.rounds})", file=sys.stderr)
        return 2
    if args.alpha < 0:
        print(f"error: --alpha must be > 0 (got {args.alpha}); leave it out for IID partitions", file=sys.stderr)
        return 2
    from .__main__ import machine

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    data = study(args.tiny, args.rounds, args.alpha) | {
        "date": datetime.date.today().isoformat(), "machine": machine(),
        "command": " ".join(["python", "-m", "benchmarks.recalibration", *(argv if argv is not None else sys.argv[1:])]),
        "seconds": time.perf_counter() - start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}")
    for n, row in data["by_batches"].items():
        print(f"{n:>3} batches: top-1 {100 * row['top1_mean']:.2f} % ({100 * row['top1_min']:.2f}-"
              f"{100 * row['top1_max']:.2f}), statistics off by {100 * row['stat_error_median']:.2f} %")
    print(f"all {data['whole_split']['batches']} batches: top-1 {100 * data['whole_split']['top1']:.2f} %; "
          f"without recalibration {100 * data['without_recalibration']['top1']:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
