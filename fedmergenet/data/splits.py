"""A run's data: its training and test sets and the clients' partitions (each computed once
and cached on disk across processes), and the loaders every arm trains from."""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..atomic import atomic_write
from ..config import PROJECT_ROOT, RunConfig
from .datasets import DeviceBatches, ImageDataset, load_dataset, make_loader
from .partition import partition_indices, split_train_val


@lru_cache(maxsize=4)
def cached_dataset(name: str, data_dir: str, train: bool, limit: int, seed: int) -> ImageDataset:
    """Read once per process (a simulated ClientApp serves many messages) and decoded once per
    machine (a deployment ClientApp process serves one, then maps the decoded split from disk)."""
    return load_dataset(name, data_dir, train=train, limit=limit, seed=seed, cache_dir=cache_dir())


def train_set(cfg: RunConfig) -> ImageDataset:
    return cached_dataset(cfg.dataset, cfg.data_dir, True, cfg.train_limit, cfg.seed)


def test_set(cfg: RunConfig) -> ImageDataset:
    return cached_dataset(cfg.dataset, cfg.data_dir, False, cfg.test_limit, cfg.seed)


def client_partitions(cfg: RunConfig, num_partitions: int | None = None) -> list[np.ndarray]:
    """Every client's indices into the training set; the central baseline trains on their union."""
    labels = train_set(cfg).labels
    alpha = cfg.alpha if cfg.alpha > 0 else None
    n = num_partitions or cfg.num_clients
    min_size = min(10, len(labels) // n)
    path = _partition_cache(cfg, labels, n, alpha, min_size)
    cached = _read_partitions(path, n)
    if cached is not None:
        return cached
    parts = partition_indices(labels, n, alpha=alpha, seed=cfg.seed, min_partition_size=min_size)
    _write_partitions(path, parts)
    return parts


def cache_dir() -> Path:
    return Path(os.environ.get("FEDMERGENET_CACHE_DIR", PROJECT_ROOT / ".cache"))


def _partition_cache(cfg: RunConfig, labels: torch.Tensor, n: int, alpha: float | None, min_size: int) -> Path:
    # The deployment runtime starts a fresh ClientApp process per message; recomputing the split
    # there imports Hugging Face datasets (~2 s). The key holds the labels themselves, so a
    # cached split can only be reused for exactly the data and settings that produced it.
    key = hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes())
    key.update(repr((n, alpha, cfg.seed, min_size)).encode())
    return cache_dir() / "partitions" / f"{key.hexdigest()[:32]}.npz"


def _read_partitions(path: Path, n: int) -> list[np.ndarray] | None:
    try:
        with np.load(path) as saved:
            parts = [saved[f"p{i}"] for i in range(n)]
    except (OSError, KeyError, ValueError):
        return None  # absent, or unreadable: compute it again
    return parts


def _write_partitions(path: Path, parts: list[np.ndarray]) -> None:
    with contextlib.suppress(OSError):  # a read-only cache only costs time
        # Clients reading concurrently see the whole file or none.
        atomic_write(path, lambda handle: np.savez(handle, **{f"p{i}": part for i, part in enumerate(parts)}))


@dataclass
class ClientData:
    train: DataLoader | DeviceBatches
    val: DataLoader | DeviceBatches
    num_train: int
    num_val: int


def client_data(cfg: RunConfig, partition_id: int, num_partitions: int, round_seed: int = 0,
                device: torch.device | None = None) -> ClientData:
    """Partition ``partition_id`` of ``num_partitions``, split into local train and validation,
    batched for ``device`` (on a GPU the partition moves there: make_loader)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    dataset = train_set(cfg)
    indices = client_partitions(cfg, num_partitions)[partition_id]
    train_idx, val_idx = split_train_val(indices, cfg.val_fraction, seed=cfg.seed + partition_id)
    # Reshuffle differently every round, yet reproducibly.
    loader_seed = cfg.seed * 100_003 + partition_id * 1_009 + round_seed
    return ClientData(
        train=make_loader(dataset, train_idx, cfg.batch_size, train=True, seed=loader_seed, device=device),
        val=make_loader(dataset, val_idx, cfg.eval_batch_size, train=False, seed=0, device=device),
        num_train=len(train_idx),
        num_val=len(val_idx),
    )


def test_loader(cfg: RunConfig, device: torch.device | None = None) -> DataLoader | DeviceBatches:
    return make_loader(test_set(cfg), None, cfg.eval_batch_size, train=False, seed=0, device=device)
