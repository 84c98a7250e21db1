"""Split a dataset's sample positions among federated clients.

The splitting itself is Flower's (`flwr_datasets.partitioner`), so our IID and
Dirichlet label-skew clients are the ones other Flower baselines use. The partitioners
work on a Hugging Face `datasets.Dataset`; we give them one with only the label and the
sample's position, and read the positions back.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from fedmergenet.errors import ConfigError

Labels = Sequence[int] | np.ndarray | torch.Tensor


def partition_indices(
    labels: Labels,
    num_partitions: int,
    alpha: float | None = None,
    seed: int = 0,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Sorted positions into `labels` for each client: IID when alpha is None, else
    Dirichlet label skew with concentration `alpha` (smaller = more skewed)."""
    targets = _as_labels(labels)
    _check_partition_args(len(targets), num_partitions, alpha, min_partition_size)
    if alpha is None:
        return _iid(targets, num_partitions, seed)
    return _dirichlet(targets, num_partitions, float(alpha), seed, min_partition_size)


def _check_partition_args(n: int, num_partitions: int, alpha: float | None, min_partition_size: int) -> None:
    if num_partitions < 1:
        raise ConfigError(f"number of clients must be >= 1, got {num_partitions}")
    if num_partitions > n:
        raise ConfigError(f"{num_partitions} clients but only {n} samples; use fewer clients or more data")
    if alpha is not None and not alpha > 0:  # `not >` also rejects NaN
        raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha}")
    if min_partition_size < 0:
        raise ConfigError(f"min partition size must be >= 0, got {min_partition_size}")


def _iid(targets: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner cuts contiguous shards, so the rows are shuffled first.
    order = np.random.default_rng(seed).permutation(len(targets))
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = _hf_dataset(targets[order], order)
    return _read_partitions(partitioner, num_partitions)


def _dirichlet(
    targets: np.ndarray, num_partitions: int, alpha: float, seed: int, min_partition_size: int
) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    advice = "use a larger alpha or fewer clients (or a smaller minimum partition size)"
    if min_partition_size * num_partitions > len(targets):
        raise ConfigError(
            f"{num_partitions} clients x at least {min_partition_size} samples needs more than "
            f"the {len(targets)} samples available; {advice}"
        )
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_partition_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = _hf_dataset(targets, np.arange(len(targets)))
    try:
        # It warns on every resampling try; the outcome is what matters, reported below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_partitions(partitioner, num_partitions)
    except ValueError as error:
        raise ConfigError(
            f"Dirichlet split with alpha={alpha} could not give each of {num_partitions} clients "
            f"at least {min_partition_size} samples; {advice}"
        ) from error


def _hf_dataset(targets: np.ndarray, positions: np.ndarray):  # -> datasets.Dataset
    import datasets  # heavy import, only needed when partitioning

    return datasets.Dataset.from_dict({"label": targets.tolist(), "index": positions.tolist()})


def _read_partitions(partitioner, num_partitions: int) -> list[np.ndarray]:
    return [
        np.sort(np.asarray(list(partitioner.load_partition(i)["index"]), dtype=np.int64))
        for i in range(num_partitions)
    ]


def _as_labels(labels: Labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels, dtype=np.int64)
    if array.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {array.shape}")
    return array


def partition_report(labels: Labels, partitions: Sequence[np.ndarray], num_classes: int) -> list[dict]:
    """Per client: {"client": i, "size": n, "label_histogram": [count of each class]}."""
    targets = _as_labels(labels)
    return [
        {
            "client": i,
            "size": int(len(part)),
            "label_histogram": _histogram(targets[np.asarray(part, dtype=np.int64)], num_classes).tolist(),
        }
        for i, part in enumerate(partitions)
    ]


def format_partition_report(report: list[dict], top: int = 3) -> str:
    """A small text table: size, classes present and the most common labels per client."""
    lines = [f"{'client':>6}  {'size':>7}  {'classes':>7}  top labels (label:count)"]
    for row in report:
        histogram = np.asarray(row["label_histogram"])
        common = np.argsort(-histogram, kind="stable")[:top]
        tops = " ".join(f"{c}:{histogram[c]}" for c in common if histogram[c] > 0)
        lines.append(f"{row['client']:>6}  {row['size']:>7}  {int((histogram > 0).sum()):>7}  {tops}")
    return "\n".join(lines)


def label_skew(labels: Labels, partitions: Sequence[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each client's label distribution and the
    global one: 0 for identical mixes, near 1 when clients hold disjoint classes."""
    targets = _as_labels(labels)
    overall = _histogram(targets, num_classes) / max(len(targets), 1)
    distances = [
        0.5 * float(np.abs(_histogram(targets[np.asarray(part, dtype=np.int64)], num_classes) / len(part) - overall).sum())
        for part in partitions
        if len(part) > 0  # an empty client has no distribution to compare
    ]
    return float(np.mean(distances)) if distances else 0.0


def _histogram(targets: np.ndarray, num_classes: int) -> np.ndarray:
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise ConfigError(f"labels must lie in 0..{num_classes - 1}")
    return np.bincount(targets, minlength=num_classes)


def split_train_val(indices: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a client's positions into sorted (train, val); at least one of each when
    val_fraction > 0 and there are two or more positions."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"validation fraction must be in [0, 1), got {val_fraction}")
    positions = np.asarray(indices, dtype=np.int64).reshape(-1)
    n_val = int(round(len(positions) * val_fraction))
    if val_fraction > 0 and len(positions) >= 2:
        n_val = min(max(n_val, 1), len(positions) - 1)
    shuffled = np.random.default_rng(seed).permutation(positions)
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])
