"""Flower Arrays to and from numpy and torch, without a .npy parse or write per tensor.

A Flower ``Array`` holds its values as the bytes ``np.save`` writes: a header that names the
dtype and shape, then the values in C order. ``Array.numpy()`` parses that header with
``ast.literal_eval`` and copies the values on every call, and ``Array(ndarray)`` runs
``np.save``; over the student's 373 tensors that is most of what a message costs to pack,
unpack, screen and load. The header depends only on dtype and shape, so here it is written
once per (dtype, shape) and compared byte for byte instead of parsed: the values are a view of
the Array's own bytes. An Array whose bytes are not laid out so (another writer, another .npy
version) goes through Flower's own ``numpy()``.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType


# A model has a few dozen distinct (dtype, shape) pairs; bounded, since a reply's packed arrays
# may claim any shape (the wire rejects those that do not fit their layout).
@lru_cache(maxsize=1024)
def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes before a C-ordered array of ``dtype`` and ``shape``."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return header.getvalue()


def as_array(values: np.ndarray) -> Array:
    """``values`` as a Flower Array, the bytes ``np.save`` writes for a C-ordered array."""
    data = npy_header(values.dtype.str, tuple(values.shape)) + values.tobytes(order="C")
    return Array(dtype=str(values.dtype), shape=tuple(int(size) for size in values.shape), stype=SType.NUMPY,
                 data=data)


def values(array: Array) -> np.ndarray:
    """``array``'s values, read-only: a view of its bytes when they hold exactly the header for
    its recorded dtype and shape and as many values as that shape has, else Flower's parse."""
    if array.stype == SType.NUMPY:
        try:
            dtype = np.dtype(array.dtype)
        except TypeError:
            return array.numpy()
        shape = tuple(array.shape)
        header = npy_header(dtype.str, shape)
        count = math.prod(shape)
        if len(array.data) == len(header) + count * dtype.itemsize and array.data.startswith(header):
            return np.frombuffer(array.data, dtype=dtype, count=count, offset=len(header)).reshape(shape)
    return array.numpy()


def tensors_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord's tensors by name, each its own writable copy, as ``to_torch_state_dict``."""
    return {name: torch.from_numpy(values(array).copy()) for name, array in record.items()}
