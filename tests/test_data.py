"""The data layer, by example: tiny files in the real on-disk formats, no network."""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from fedmergenet.data import (
    DATASETS,
    FASHION_MNIST_DIRS,
    DeviceBatches,
    augment_batch,
    describe,
    format_partition_report,
    label_skew,
    load_dataset,
    make_loader,
    partition_indices,
    partition_report,
    split_train_val,
)
from fedmergenet.data.datasets import augment
from fedmergenet.errors import ConfigError, DatasetError

# --- writing tiny datasets in the official formats --------------------------------


def write_cifar100(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """root/cifar-100-python/{train,test} as the python pickles of the official archive."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        batch = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{split} batch".encode(),
            b"fine_labels": [i % 100 for i in range(n)],
            b"coarse_labels": [i % 20 for i in range(n)],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        }
        with (folder / split).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """An idx file: big-endian magic and dims, then the uint8 data, gzipped."""
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder: Path, n_train: int = 30, n_test: int = 12) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        # Images never 0 inside, so the zero border is visible after padding.
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(1, 256, (n, 28, 28)), 2051)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    write_cifar100(tmp_path)
    return tmp_path


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    write_fashion_mnist(tmp_path / "fashion-mnist")
    return tmp_path


# --- loading --------------------------------------------------------------------


def test_cifar100_loads_the_official_pickle_format(cifar_dir: Path) -> None:
    train = load_dataset("cifar100", cifar_dir, train=True, download=False)
    test = load_dataset("cifar100", cifar_dir, train=False, download=False)

    assert (len(train), len(test)) == (40, 20)
    assert train.images.shape == (40, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [i % 100 for i in range(40)]
    assert train.num_classes == 100 and train.mean == (0.5071, 0.4865, 0.4409)
    # The flat 3072 bytes are channel-major: the first 1024 are the red plane.
    with (cifar_dir / "cifar-100-python" / "train").open("rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    assert torch.equal(train.images[3, 0].flatten(), torch.from_numpy(raw[3, :1024]))
    assert describe(train).startswith("cifar100: 40 images")


def test_limit_keeps_the_same_random_subset_for_the_same_seed(cifar_dir: Path) -> None:
    first = load_dataset("cifar100", cifar_dir, train=True, limit=10, seed=3, download=False)
    again = load_dataset("cifar100", cifar_dir, train=True, limit=10, seed=3, download=False)
    other = load_dataset("cifar100", cifar_dir, train=True, limit=10, seed=4, download=False)

    assert len(first) == 10
    assert torch.equal(first.labels, again.labels) and torch.equal(first.images, again.images)
    assert not torch.equal(first.labels, other.labels)
    assert len(load_dataset("cifar100", cifar_dir, train=True, limit=0, download=False)) == 40
    assert len(load_dataset("cifar100", cifar_dir, train=True, limit=1000, download=False)) == 40


def test_missing_cifar100_offline_names_the_folder_and_the_offline_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar100", tmp_path, train=True, download=False)
    message = str(info.value)
    assert str(tmp_path / "cifar-100-python") in message
    assert "fashion-mnist" in message and "\n" not in message


def test_failed_cifar100_download_becomes_a_dataset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError, match="download failed.*fashion-mnist"):
        load_dataset("cifar100", tmp_path, train=True, download=True)


def test_fashion_mnist_is_padded_to_three_channel_32x32(fashion_dir: Path) -> None:
    ds = load_dataset("fashion-mnist", fashion_dir, train=True, download=False, system_dirs=())

    assert ds.images.shape == (30, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 10 and ds.labels.tolist() == [i % 10 for i in range(30)]
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (ds.images[:, :, border] == 0).all()
    assert (ds.images[:, :, 2:30, 2:30] > 0).all()
    assert torch.equal(ds.images[:, 0], ds.images[:, 1]) and torch.equal(ds.images[:, 0], ds.images[:, 2])
    assert len(load_dataset("fashion-mnist", fashion_dir, train=False, download=False, system_dirs=())) == 12


def test_a_decoded_split_is_kept_on_disk_for_the_next_process_until_its_files_change(
        fashion_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deployment starts a fresh ClientApp process per message: the first decodes the split, the
    next ones map it from the cache, and the same subsets come out either way."""
    from fedmergenet.data import datasets

    cache = tmp_path / "cache"

    def load(**kwargs) -> datasets.ImageDataset:
        return load_dataset("fashion-mnist", fashion_dir, train=True, download=False, system_dirs=(), **kwargs)

    first = load(cache_dir=cache)
    assert len(list(cache.glob("decoded/*/images.npy"))) == 1

    def must_not_decode(*_files):
        raise AssertionError("the cached split should have been mapped")

    with monkeypatch.context() as patched:
        patched.setattr(datasets, "_read_fashion_mnist", must_not_decode)
        whole, subset = load(cache_dir=cache), load(cache_dir=cache, limit=7, seed=2)
    assert torch.equal(whole.images, first.images) and torch.equal(whole.labels, first.labels)
    uncached = load(limit=7, seed=2)
    assert torch.equal(subset.images, uncached.images) and torch.equal(subset.labels, uncached.labels)

    write_idx(fashion_dir / "fashion-mnist" / "train-images-idx3-ubyte.gz", np.full((30, 28, 28), 9), 2051)
    changed = load(cache_dir=cache)
    assert (changed.images[:, :, 2:30, 2:30] == 9).all()  # the new files, not the old entry
    assert len(list(cache.glob("decoded/*/images.npy"))) == 2

    for entry in cache.glob("decoded/*/images.npy"):
        entry.write_bytes(b"damaged")
    assert torch.equal(load(cache_dir=cache).images, changed.images)  # decoded again


def test_fashion_mnist_is_found_in_torchvisions_raw_folder_too(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    assert len(load_dataset("fashion-mnist", tmp_path, train=True, download=False, system_dirs=())) == 30


def test_fashion_mnist_from_a_system_folder(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path / "system")
    ds = load_dataset("fashion-mnist", tmp_path / "empty", train=True, download=False, system_dirs=[tmp_path / "system"])
    assert len(ds) == 30


def test_wrong_idx_magic_number_names_the_file(fashion_dir: Path) -> None:
    bad = fashion_dir / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
    write_idx(bad, np.zeros(30), magic=2051)  # the images' magic on a labels file
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz.*2049"):
        load_dataset("fashion-mnist", fashion_dir, train=True, download=False, system_dirs=())


def test_missing_fashion_mnist_lists_the_folders_and_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist", tmp_path, train=True, download=True, system_dirs=())
    message = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message and str(tmp_path / "fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cifar100, fashion-mnist"):
        load_dataset("imagenet", tmp_path, train=True)
    assert DATASETS == ("cifar100", "fashion-mnist")


@pytest.mark.skipif(not all(d.is_dir() for d in FASHION_MNIST_DIRS), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package(tmp_path: Path) -> None:
    ds = load_dataset("fashion-mnist", tmp_path, train=False, limit=100, seed=0, download=False)
    assert ds.images.shape == (100, 3, 32, 32)
    assert 0 <= int(ds.labels.min()) and int(ds.labels.max()) <= 9
    assert ds.images[:, :, 2:30, 2:30].float().mean() / 255 == pytest.approx(0.286, abs=0.05)


# --- loaders --------------------------------------------------------------------


def test_loader_yields_normalised_float_batches(cifar_dir: Path) -> None:
    ds = load_dataset("cifar100", cifar_dir, train=True, download=False)
    loader = make_loader(ds, np.arange(25), batch_size=8, train=False, seed=0)

    batches = list(loader)
    assert [len(y) for _, y in batches] == [8, 8, 8, 1]  # drop_last=False
    images, labels = batches[0]
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == ds.labels[:8].tolist()
    mean = torch.tensor(ds.mean).view(3, 1, 1)
    std = torch.tensor(ds.std).view(3, 1, 1)
    assert torch.allclose(images[0], (ds.images[0].float() / 255 - mean) / std, atol=1e-5)


def test_train_loader_shuffles_and_augments_the_same_way_for_the_same_seed(cifar_dir: Path) -> None:
    ds = load_dataset("cifar100", cifar_dir, train=True, download=False)

    def first_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        return next(iter(make_loader(ds, None, batch_size=16, train=True, seed=seed)))

    (x1, y1), (x2, y2), (_, y3) = first_batch(7), first_batch(7), first_batch(8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    # Augmented: not the plain normalised images of the same samples.
    plain = torch.stack([make_loader(ds, None, 1, train=False, seed=0).dataset[int(i)][0] for i in _positions(ds, y1)])
    assert not torch.allclose(x1, plain)


def test_batched_augmentation_draws_what_the_per_image_one_draws() -> None:
    """MergeNet's crop, flip and rotation made for a whole batch at once (the GPU path) against
    the per-image version (the CPU loader), on an image with a left-right ramp, a top-bottom ramp
    and a flat channel: 4,000 draws each way flip as often, give the same mean image and the same
    share of zero-filled pixels, within sampling noise."""
    ramp = torch.linspace(30, 255, 32)
    image = torch.stack([ramp.expand(32, 32), ramp[:, None].expand(32, 32), torch.full((32, 32), 200.0)])
    image = image.round().to(torch.uint8)
    draws = 4000
    per_image = torch.stack([augment(image, torch.Generator().manual_seed(i)) for i in range(draws)]).float()
    batched = augment_batch(image.expand(draws, -1, -1, -1).contiguous(), torch.Generator().manual_seed(1))
    assert batched.shape == per_image.shape and batched.dtype == torch.float32
    assert torch.equal(batched, batched.round()) and 0 <= batched.min() and batched.max() <= 255

    def flipped(x: torch.Tensor) -> float:  # the left-right ramp runs the other way
        return float((x[:, 0, 8:24, :12].mean((1, 2)) > x[:, 0, 8:24, 20:].mean((1, 2))).float().mean())

    assert flipped(batched) == pytest.approx(0.5, abs=0.03) and flipped(per_image) == pytest.approx(0.5, abs=0.03)
    assert (batched.mean(0) - per_image.mean(0)).abs().mean() < 1.5  # grey levels of ~150
    zeros = [float((x == 0).float().mean()) for x in (batched, per_image)]
    assert zeros[0] == pytest.approx(zeros[1], abs=0.005) and zeros[0] > 0.05  # padding and corners


def test_device_batches_give_every_image_once_per_epoch_in_a_new_order(cifar_dir: Path) -> None:
    """The split on the training device (here the CPU, as on a GPU): every index once per
    epoch, a new order each epoch, the same batches for the same seed; without augmentation the
    images are exactly the CPU loader's."""
    ds = load_dataset("cifar100", cifar_dir, train=True, download=False)
    device = torch.device("cpu")

    def epochs(seed: int, count: int = 2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        batches = DeviceBatches(ds, np.arange(30), batch_size=8, train=True, seed=seed, device=device)
        assert len(batches) == 4
        return [list(batches) for _ in range(count)]

    first, second = epochs(3)
    for epoch in (first, second):
        assert [len(y) for _, y in epoch] == [8, 8, 8, 6]
        assert sorted(torch.cat([y for _, y in epoch]).tolist()) == sorted(ds.labels[:30].tolist())
    assert torch.cat([y for _, y in first]).tolist() != torch.cat([y for _, y in second]).tolist()
    again = epochs(3)[0]
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(first, again))

    plain = DeviceBatches(ds, np.arange(30), batch_size=8, train=False, seed=0, device=device)
    for (x, y), (x_cpu, y_cpu) in zip(plain, make_loader(ds, np.arange(30), batch_size=8, train=False, seed=0)):
        assert torch.equal(y, y_cpu) and torch.allclose(x, x_cpu, atol=1e-6)


def test_a_split_moves_to_the_device_once_per_process(cifar_dir: Path) -> None:
    """A client's batches for the next message (or for training after recalibrating) reuse the
    split already on the device: the same indices share one copy, other indices get their own,
    and batching never writes into it."""
    ds = load_dataset("cifar100", cifar_dir, train=True, download=False)
    device = torch.device("cpu")
    first = DeviceBatches(ds, np.arange(30), batch_size=8, train=True, seed=0, device=device)
    before = first.images.clone()
    list(first)
    again = DeviceBatches(ds, np.arange(30), batch_size=16, train=False, seed=5, device=device)
    other = DeviceBatches(ds, np.arange(1, 31), batch_size=8, train=True, seed=0, device=device)
    assert again.images.data_ptr() == first.images.data_ptr() and again.labels.data_ptr() == first.labels.data_ptr()
    assert other.images.data_ptr() != first.images.data_ptr()
    assert torch.equal(other.labels, ds.labels[1:31]) and torch.equal(first.images, before)


def _positions(ds, labels: torch.Tensor) -> list[int]:
    # Labels are i % 100 and there are 40 samples, so a label is its position.
    assert len(ds) <= 100
    return labels.tolist()


# --- partitions -----------------------------------------------------------------


def _labels(n: int = 1000, classes: int = 10) -> np.ndarray:
    return np.random.default_rng(0).integers(0, classes, n)


def _assert_disjoint_cover(partitions: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(partitions)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))
    assert all(np.array_equal(p, np.sort(p)) for p in partitions)


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_partitions_are_disjoint_cover_everything_and_repeat_by_seed(alpha: float | None) -> None:
    labels = _labels()
    parts = partition_indices(labels, num_partitions=5, alpha=alpha, seed=1)

    _assert_disjoint_cover(parts, len(labels))
    again = partition_indices(torch.from_numpy(labels), num_partitions=5, alpha=alpha, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(labels, num_partitions=5, alpha=alpha, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_partitions_are_random_and_balanced() -> None:
    parts = partition_indices(_labels(), num_partitions=4, alpha=None, seed=0)
    assert [len(p) for p in parts] == [250, 250, 250, 250]
    assert not np.array_equal(parts[0], np.arange(250))  # shuffled, not a contiguous shard


def test_dirichlet_respects_min_partition_size() -> None:
    parts = partition_indices(_labels(), num_partitions=10, alpha=0.3, seed=0, min_partition_size=40)
    assert min(len(p) for p in parts) >= 40


def test_smaller_alpha_gives_more_label_skew() -> None:
    labels = _labels(2000)
    skew = {
        alpha: label_skew(labels, partition_indices(labels, 10, alpha=alpha, seed=0, min_partition_size=5), 10)
        for alpha in (None, 100.0, 0.1)
    }
    assert skew[0.1] > 0.4
    assert skew[0.1] > 3 * skew[100.0] and skew[0.1] > 3 * skew[None]


def test_partition_report_counts_labels_per_client() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    report = partition_report(labels, [np.array([0, 1, 2]), np.array([3, 4, 5])], num_classes=3)
    assert report == [
        {"client": 0, "size": 3, "label_histogram": [2, 1, 0]},
        {"client": 1, "size": 3, "label_histogram": [0, 0, 3]},
    ]
    table = format_partition_report(report)
    assert table.splitlines()[2].split()[:3] == ["1", "3", "1"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_partitions": 2, "alpha": 0.0}, "alpha"),
        ({"num_partitions": 2, "alpha": -1.0}, "alpha"),
        ({"num_partitions": 0}, "clients"),
        ({"num_partitions": 101}, "samples"),
        ({"num_partitions": 10, "alpha": 0.5, "min_partition_size": 20}, "larger alpha"),
    ],
)
def test_bad_partition_options_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        partition_indices(_labels(100), **kwargs)


def test_dirichlet_that_cannot_reach_the_minimum_is_a_config_error() -> None:
    # Possible on paper (100 >= 4 x 20), but alpha=0.01 gives almost all of a class to one client.
    with pytest.raises(ConfigError, match="larger alpha or fewer clients"):
        partition_indices(_labels(100, classes=2), num_partitions=4, alpha=0.01, seed=0, min_partition_size=20)


def test_split_train_val_is_disjoint_covering_and_repeatable() -> None:
    indices = np.arange(100, 150)
    train, val = split_train_val(indices, val_fraction=0.2, seed=3)

    assert (len(train), len(val)) == (40, 10)
    assert np.array_equal(np.sort(np.concatenate([train, val])), indices)
    again = split_train_val(indices, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert [len(part) for part in split_train_val(np.array([5, 9]), 0.01, seed=0)] == [1, 1]
    assert len(split_train_val(indices, 0.0, seed=0)[1]) == 0
    with pytest.raises(ConfigError):
        split_train_val(indices, 1.0, seed=0)


def test_client_partitions_are_computed_once_and_then_read_from_the_cache(
    cifar_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deployment starts a fresh ClientApp process per message: the split is cached on disk."""
    from fedmergenet.config import RunConfig
    from fedmergenet.data import splits as task

    monkeypatch.setenv("FEDMERGENET_CACHE_DIR", str(tmp_path / "cache"))
    cfg = RunConfig(dataset="cifar100", data_dir=str(cifar_dir), num_clients=4, alpha=0.0, seed=3)
    first = task.client_partitions(cfg)
    assert len(list((tmp_path / "cache" / "partitions").glob("*.npz"))) == 1

    def must_not_split(*args, **kwargs):
        raise AssertionError("the cached split should have been read")

    with monkeypatch.context() as patched:
        patched.setattr(task, "partition_indices", must_not_split)
        again = task.client_partitions(cfg)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))

    other_seed = task.client_partitions(dataclasses.replace(cfg, seed=4))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other_seed))  # its own entry
    for damaged in (tmp_path / "cache" / "partitions").glob("*.npz"):
        damaged.write_bytes(b"not an npz")
    assert all(np.array_equal(a, b) for a, b in zip(first, task.client_partitions(cfg)))  # recomputed


def test_augmentation_crops_flips_and_rotates_a_little_and_repeats_by_seed() -> None:
    from fedmergenet.data.datasets import augment

    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    outputs = [augment(image, torch.Generator().manual_seed(seed)) for seed in range(40)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.uint8 for o in outputs)
    assert all(set(o.unique().tolist()) <= {0, 200} for o in outputs)  # nearest: no new values, zero fill
    assert all((o[:, 12:20, 12:20] == 200).all() for o in outputs)  # at most 4 px and 15 degrees away
    zeros = [float((o == 0).float().mean()) for o in outputs]  # the padding and the rotated-in corners
    assert max(zeros) > 0 and sum(zeros) / len(zeros) < 0.25
    assert torch.equal(augment(image, torch.Generator().manual_seed(3)), outputs[3])
    # A rotation, not only shifts: a vertical bar comes out tilted for some seed.
    bar = torch.zeros((3, 32, 32), dtype=torch.uint8)
    bar[:, :, 15:17] = 255
    tilted = [augment(bar, torch.Generator().manual_seed(seed)) for seed in range(20)]
    assert any(len({int(row.nonzero()[0]) for row in t[0, 4:28] if row.any()}) > 3 for t in tilted)
