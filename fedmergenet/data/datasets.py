"""Image datasets as uint8 tensors, and the loaders that feed them to a model.

Both datasets end up in one shape, uint8 [N, 3, 32, 32], so that the same
MobileNetV2 student and ResNet50 teacher fit either of them without changes.
Files are read by our own small readers: torchvision's dataset classes check the md5
of the whole archive, which would refuse the tiny files the tests write.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import pickle
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from fedmergenet.atomic import atomic_write
from fedmergenet.config import DATASETS
from fedmergenet.errors import ConfigError, DatasetError

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# Folders outside data_dir searched for the idx files, after data_dir's own; the
# Debian package `dataset-fashion-mnist` installs here, which makes it work offline.
FASHION_MNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
# The usual Fashion-MNIST statistics of the 28x28 images. We apply them to the
# zero-padded 32x32 images unchanged, so the border normalises to a constant
# (-0.81) rather than to exactly zero; this keeps the numbers everybody quotes.
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == is ambiguous
class ImageDataset:
    """A whole split in memory: uint8 images [N, 3, 32, 32] and int64 labels [N]."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or tuple(self.images.shape[1:]) != (3, 32, 32):
            raise ValueError(f"images must be uint8 [N, 3, 32, 32], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 [{len(self.images)}], got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def describe(ds: ImageDataset) -> str:
    """One line for logs: name, size, classes and how many classes are present."""
    present = int(torch.unique(ds.labels).numel())
    return f"{ds.name}: {len(ds)} images 3x32x32 uint8, {ds.num_classes} classes ({present} present)"


def load_dataset(
    name: str,
    data_dir: str | Path,
    train: bool,
    limit: int = 0,
    seed: int = 0,
    download: bool = True,
    system_dirs: Sequence[str | Path] = FASHION_MNIST_DIRS,
    cache_dir: Path | None = None,
) -> ImageDataset:
    """Load the train or test split of `name`; `limit > 0` keeps a seeded random subset.

    `system_dirs` are searched for Fashion-MNIST after `data_dir` (tests pass their own). With
    `cache_dir`, the whole decoded split is kept there and a later process maps it from the
    disk instead of decompressing and converting the files again: Flower's deployment runtime
    starts a fresh ClientApp process for every message.
    """
    key = name.strip().lower()
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if limit < 0:
        raise ConfigError(f"limit must be >= 0 (0 keeps all samples), got {limit}")
    root = Path(data_dir).expanduser()
    if key == "cifar100":
        sources = [_cifar100_file(root, train, download)]
        num_classes, mean, std = 100, CIFAR100_MEAN, CIFAR100_STD
    else:
        sources = list(_fashion_mnist_files(root, train, download, [Path(d) for d in system_dirs]))
        num_classes, mean, std = 10, FASHION_MNIST_MEAN, FASHION_MNIST_STD
    images, labels = _decoded(key, sources, cache_dir)
    keep = _subset_positions(len(labels), limit, seed)
    if keep is not None:
        images, labels = images[keep], labels[keep]
    return ImageDataset(
        name=key,
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=num_classes,
        mean=mean,
        std=std,
    )


# Bumped when the decoded layout changes, so that old cache entries are never read.
DECODED_FORMAT = 1


def _decoded(key: str, sources: Sequence[Path], cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The whole split as uint8 [N, 3, 32, 32] and int64 [N]: from the cache when it holds
    these very source files (path, size and modification time), else decoded (and cached)."""
    decode = _read_cifar100_split if key == "cifar100" else _read_fashion_mnist
    if cache_dir is None:
        return decode(*sources)
    digest = hashlib.sha256(repr((DECODED_FORMAT, key)).encode())
    for source in sources:
        stat = source.stat()
        digest.update(repr((str(source.resolve()), stat.st_size, stat.st_mtime_ns)).encode())
    folder = Path(cache_dir) / "decoded" / digest.hexdigest()[:32]
    with contextlib.suppress(OSError, ValueError, EOFError):
        labels = np.load(folder / "labels.npy")
        images = np.load(folder / "images.npy", mmap_mode="c")  # copy-on-write: read lazily, never written back
        if images.dtype == np.uint8 and images.shape == (len(labels), 3, 32, 32) and labels.dtype == np.int64:
            return images, labels
    images, labels = decode(*sources)
    # Written whole or not at all (a reader checks the shapes); a read-only cache only costs time.
    with contextlib.suppress(OSError):
        atomic_write(folder / "labels.npy", lambda handle: np.save(handle, labels), sync=False)
        atomic_write(folder / "images.npy", lambda handle: np.save(handle, images), sync=False)
    return images, labels


def _subset_positions(n: int, limit: int, seed: int) -> np.ndarray | None:
    """Sorted positions of a random subset of size `limit`, the same for the same seed."""
    if limit == 0 or limit >= n:
        return None
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=generator)[:limit]
    return np.sort(chosen.numpy())


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- CIFAR-100 ------------------------------------------------------------------


def _cifar100_file(root: Path, train: bool, download: bool) -> Path:
    folder = root / CIFAR100_FOLDER
    if not folder.is_dir():
        _download_cifar100(root, folder, download)
    path = folder / ("train" if train else "test")
    if not path.is_file():
        raise DatasetError(f"CIFAR-100 file missing: {path}")
    return path


def _download_cifar100(root: Path, folder: Path, download: bool) -> None:
    hint = "use --dataset fashion-mnist, which works offline"
    if not download:
        raise DatasetError(f"CIFAR-100 not found in {folder} and download is off; {hint}")
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR100_URL, download_root=str(root), md5=CIFAR100_MD5)
    except Exception as error:  # any network or archive failure means the same to the user
        raise DatasetError(
            f"CIFAR-100 not found in {folder} and download failed ({_one_line(error)}); {hint}"
        ) from error
    if not folder.is_dir():
        raise DatasetError(f"CIFAR-100 archive did not contain {folder}; {hint}")


def _read_cifar100_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickle of the official python version: b"data" [N, 3072], b"fine_labels"."""
    try:
        with path.open("rb") as f:
            # The official format is a pickle; it only comes from data_dir the user chose.
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"cannot read CIFAR-100 file {path}: {_one_line(error)}") from error
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetError(f"CIFAR-100 file {path} has data {data.shape} and {len(labels)} labels, expected [N, 3072] and N")
    if len(labels) and (labels.min() < 0 or labels.max() > 99):
        raise DatasetError(f"CIFAR-100 file {path} has labels outside 0..99")
    return data.reshape(-1, 3, 32, 32), labels


# --- Fashion-MNIST --------------------------------------------------------------


def fashion_mnist_dirs(data_dir: str | Path, system_dirs: Sequence[str | Path] = FASHION_MNIST_DIRS) -> list[Path]:
    """Folders searched for the idx files, in order: torchvision's, ours, the system's."""
    root = Path(data_dir).expanduser()
    return [root / "FashionMNIST" / "raw", root / "fashion-mnist", *(Path(d) for d in system_dirs)]


def _fashion_mnist_files(root: Path, train: bool, download: bool, system_dirs: list[Path]) -> tuple[Path, Path]:
    """The split's images and labels idx files: found, or downloaded into ``root``."""
    folders = fashion_mnist_dirs(root, system_dirs)
    found = _find_idx_pair(folders, train)
    reason = "download is off"
    if found is None and download:
        reason = _download_fashion_mnist(root, train)
        found = _find_idx_pair(folders[:1], train)
    if found is None:
        searched = ", ".join(str(f) for f in folders)
        raise DatasetError(
            f"Fashion-MNIST not found in {searched} ({reason}); "
            "install it offline with `apt-get install dataset-fashion-mnist`"
        )
    return found


def _read_fashion_mnist(images_file: Path, labels_file: Path) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(images_file, _IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_file, _IDX_LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"Fashion-MNIST files {images_file} and {labels_file} do not match: "
                           f"{images.shape} vs {labels.shape}")
    return _grey28_to_rgb32(images), labels.astype(np.int64)


def _download_fashion_mnist(root: Path, train: bool) -> str:
    """Try torchvision's download into root/FashionMNIST/raw; return why it failed, if so."""
    import torchvision

    try:
        torchvision.datasets.FashionMNIST(root=str(root), train=train, download=True)
    except Exception as error:  # offline, a proxy, a bad archive: all mean "not available"
        return f"download failed: {_one_line(error)}"
    return "download gave no idx files"


def _find_idx_pair(folders: Sequence[Path], train: bool) -> tuple[Path, Path] | None:
    """The first folder holding both the images and labels file of the split."""
    prefix = "train" if train else "t10k"
    for folder in folders:
        images = _find_file(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_file(folder, f"{prefix}-labels-idx1-ubyte")
        if images is not None and labels is not None:
            return images, labels
    return None


def _find_file(folder: Path, stem: str) -> Path | None:
    # Prefer the plain file: torchvision leaves both, and it is faster to read.
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read an idx file (plain or gz): big-endian magic, one uint32 per dim, uint8 data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"cannot read idx file {path}: {_one_line(error)}") from error
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != expected_magic:
        found = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
        raise DatasetError(f"idx file {path} has magic number {found}, expected {expected_magic}")
    ndim = raw[3]  # the last magic byte is the number of dimensions
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"idx file {path} is truncated: {data.size} bytes of data for shape {dims}")
    return data.reshape(dims)


def _grey28_to_rgb32(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> [N, 3, 32, 32]: 2 zero pixels each side, grey copied to RGB."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[:, None], 3, axis=1)


# --- Loading batches ------------------------------------------------------------


# MergeNet's CIFAR-100 training augmentation: RandomCrop(32, padding=4), RandomHorizontalFlip,
# RandomRotation(15) with nearest sampling and zero fill.
CROP_PADDING = 4
MAX_ROTATION_DEGREES = 15.0


def augment(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MergeNet's augmentation on one uint8 [3, 32, 32] image, drawn from ``generator``.

    Written in torch instead of torchvision.transforms: importing torchvision cost 2.4 s in
    every deployment ClientApp process, a third of its start-up (BENCHMARKS.md, 1f)."""
    height, width = image.shape[-2:]
    pad = CROP_PADDING
    padded = F.pad(image, (pad, pad, pad, pad))
    top, left = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    image = padded[:, top:top + height, left:left + width]
    if torch.rand((), generator=generator) < 0.5:
        image = image.flip(-1)
    angle = math.radians(float(torch.empty(()).uniform_(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES,
                                                        generator=generator)))
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]])
    grid = F.affine_grid(theta, [1, image.shape[0], height, width], align_corners=False)
    rotated = F.grid_sample(image[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return rotated[0].to(torch.uint8)


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The same augmentation drawn independently for every image of a uint8 [B, 3, H, W] batch,
    in a few batched operations on the batch's device (no per-image Python); float out."""
    batch, _, height, width = images.shape
    pad, device = CROP_PADDING, images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (batch, 1), device=device, generator=generator)
    left = torch.randint(0, 2 * pad + 1, (batch, 1), device=device, generator=generator)
    rows = top + torch.arange(height, device=device)
    cols = left + torch.arange(width, device=device)
    flip = torch.rand(batch, 1, device=device, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(-1), cols)  # a flipped crop reads its columns backwards
    crops = padded[torch.arange(batch, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    angle = torch.empty(batch, device=device).uniform_(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES,
                                                       generator=generator)
    return _rotate(crops.permute(0, 3, 1, 2).float(), angle)


def _rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each float [3, H, W] image of the batch turned by its angle about its centre (nearest, zero fill)."""
    radians = torch.deg2rad(degrees.double())  # as augment's math.cos in double, then float
    cos, sin, zero = radians.cos(), radians.sin(), torch.zeros_like(radians)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class TensorImageDataset(Dataset):
    """Normalised float samples of an ImageDataset at `indices`, augmented when `train`.

    Indexed by a position, or by `(position, seed)` as `make_loader` does: then the
    augmentation is drawn from that seed, so a run is repeatable whatever the workers.
    """

    def __init__(self, ds: ImageDataset, indices: Sequence[int] | np.ndarray | None, train: bool) -> None:
        self.ds = ds
        self.indices = _as_index_array(indices, len(ds))
        self.train = train
        self.mean = torch.tensor(ds.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(ds.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        position, seed = key if isinstance(key, tuple) else (key, None)
        index = int(self.indices[position])
        image = self.ds.images[index]
        if self.train:
            # A seed per sample: repeatable whatever the order or the workers, and the
            # global RNG is neither read nor disturbed.
            generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
            image = augment(image, generator)
        return (image.float() / 255 - self.mean) / self.std, int(self.ds.labels[index])


class _SeededShuffleSampler(Sampler):
    """Yields (position, augmentation seed) in a fresh random order each epoch."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size = size
        self.generator = generator

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=self.generator).tolist()
        seeds = torch.randint(0, 2**62, (self.size,), generator=self.generator).tolist()
        return iter(zip(order, seeds))


class DeviceBatches:
    """Batches of (float [B, 3, 32, 32], int64 [B]) from a split that lives on ``device`` as
    uint8 (Fashion-MNIST's 60k training images are 184 MB), shuffled and augmented there in
    whole batches: on a GPU a per-image loader in Python, not the model, set the pace.

    Iterating again gives the next epoch: a new order and new augmentation, all drawn from
    one generator seeded with ``seed`` on the device."""

    def __init__(self, ds: ImageDataset, indices: Sequence[int] | np.ndarray | None, batch_size: int, train: bool,
                 seed: int, device: torch.device, augment: bool = True) -> None:
        self.images, self.labels = _split_on(ds, _Positions.of(_as_index_array(indices, len(ds))), device)
        self.batch_size, self.train, self.augment = batch_size, train, train and augment
        self.mean = torch.tensor(ds.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(ds.std, device=device).view(1, -1, 1, 1)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size, device = len(self.labels), self.labels.device
        order = (torch.randperm(size, device=device, generator=self.generator) if self.train
                 else torch.arange(size, device=device))
        for start in range(0, size, self.batch_size):
            batch = order[start:start + self.batch_size]
            images = self.images[batch]
            images = augment_batch(images, self.generator) if self.augment else images.float()
            yield (images / 255 - self.mean) / self.std, self.labels[batch]


@dataclass(frozen=True)
class _Positions:
    """Indices into a split, hashable by their content."""

    digest: str
    array: np.ndarray = field(compare=False, hash=False)

    @classmethod
    def of(cls, array: np.ndarray) -> _Positions:
        return cls(hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest(), array)


# A simulated ClientApp (a Ray actor) builds its client's batches again for every message, twice
# when it also recalibrates: the split stays on the card between them instead of being gathered
# on the host and copied up each time (55 MB per client of full Fashion-MNIST). Read-only: batches
# index it into new tensors.
@lru_cache(maxsize=8)
def _split_on(ds: ImageDataset, positions: _Positions, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.from_numpy(positions.array)
    return ds.images[index].to(device), ds.labels[index].to(device)


def make_loader(
    ds: ImageDataset,
    indices: Sequence[int] | np.ndarray | None,
    batch_size: int,
    train: bool,
    seed: int,
    device: torch.device | None = None,
    augment: bool = True,
) -> DataLoader | DeviceBatches:
    """Batches of (float [B, 3, 32, 32], int64 [B]); train order and augmentation follow `seed`.

    `train` shuffles each epoch and, unless `augment` is False, augments. For a CUDA `device`
    the split moves there and batches are made on the card (DeviceBatches); on the CPU a
    DataLoader augments image by image, each from a seed of its own."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if device is not None and device.type == "cuda":
        return DeviceBatches(ds, indices, batch_size, train, seed, device, augment)
    dataset = TensorImageDataset(ds, indices, train and augment)
    sampler = None
    if train:
        sampler = _SeededShuffleSampler(len(dataset), torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False)


def _as_index_array(indices: Sequence[int] | np.ndarray | None, size: int) -> np.ndarray:
    if indices is None:
        return np.arange(size, dtype=np.int64)
    array = np.asarray(indices, dtype=np.int64).reshape(-1)
    if array.size and (array.min() < 0 or array.max() >= size):
        raise ConfigError(f"indices must lie in 0..{size - 1}")
    return array
