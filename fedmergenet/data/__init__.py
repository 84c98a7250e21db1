"""Data layer: datasets as uint8 tensors, loaders, and client partitions."""

from fedmergenet.data.datasets import (
    CIFAR100_MD5,
    CIFAR100_URL,
    DATASETS,
    FASHION_MNIST_DIRS,
    DeviceBatches,
    ImageDataset,
    TensorImageDataset,
    augment_batch,
    describe,
    fashion_mnist_dirs,
    load_dataset,
    make_loader,
)
from fedmergenet.data.partition import (
    format_partition_report,
    label_skew,
    partition_indices,
    partition_report,
    split_train_val,
)

__all__ = [
    "CIFAR100_MD5",
    "CIFAR100_URL",
    "DATASETS",
    "FASHION_MNIST_DIRS",
    "DeviceBatches",
    "ImageDataset",
    "TensorImageDataset",
    "augment_batch",
    "describe",
    "fashion_mnist_dirs",
    "format_partition_report",
    "label_skew",
    "load_dataset",
    "make_loader",
    "partition_indices",
    "partition_report",
    "split_train_val",
]
