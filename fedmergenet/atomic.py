"""Saving a file so that a reader, or a resume after a crash, sees the whole old file or the
whole new one, never half of one: write a temporary file beside it, sync, rename over it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], sync: bool = True) -> None:
    """Call ``write`` on a binary file handle; the result replaces ``path`` in one step.
    ``sync=False`` skips waiting for the disk: for caches, which a crash may only cost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results and checkpoints are for reading
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save``, atomically (checkpoints, models, the server's resumable state)."""
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle))
