"""The server's whole state after a round, written atomically so a crash can resume.

Global weights, the adapter with its optimiser and schedule, the fused layer in
circulation, round number, best accuracy and RNG states. Loads with ``weights_only=True``.

The adapter with its AdamW moments makes the state about half a gigabyte, so the ServerApp
writes it in the background (StateWriter) while the next round's clients train. A crash
before a write lands leaves the previous state whole, and resume then drops the metrics
rows after it and runs those rounds again.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..atomic import save_torch
from ..training import moved

STATE_FILE = "server_state.pt"


@dataclass
class ServerState:
    round: int
    arrays: dict[str, torch.Tensor]
    fusion: dict[str, Any] | None
    pending_fused: torch.Tensor | None
    best_top1: float
    elapsed_s: float


def save_state(out: Path, state: ServerState) -> None:
    save_torch(out / STATE_FILE, _payload(state))


def _payload(state: ServerState) -> dict[str, Any]:
    return {
        "round": state.round,
        "arrays": state.arrays,
        "fusion": state.fusion,
        "pending_fused": state.pending_fused,
        "best_top1": state.best_top1,
        "elapsed_s": state.elapsed_s,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": _numpy_state(),
        "python_rng": _python_state(),
    }


def _snapshot(obj: Any) -> Any:
    """``obj`` with every tensor copied to the CPU: training goes on changing the originals in
    place. The tensors on a device (the adapter and its AdamW moments on a GPU) come over in one
    copy per dtype (``moved``), not one wait on the card each."""
    on_device = {str(id(t)): t.detach() for t in _tensors(obj) if t.device.type != "cpu"}
    copies = moved(on_device, "cpu")

    def copied(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return copies[str(id(value))] if value.device.type != "cpu" else value.detach().clone()
        if isinstance(value, dict):
            return {key: copied(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copied(item) for item in value)
        return value

    return copied(obj)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


class StateWriter:
    """Saves the state of each round in a background thread, one write at a time: ``save``
    returns once the state is copied, and waits first for the previous write to land.

    ``snapshot`` and ``write`` are its two halves, for a state copied at one point of the round
    loop and written at a later one."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: ServerState) -> None:
        self.write(self.snapshot(state))

    @staticmethod
    def snapshot(state: ServerState) -> dict[str, Any]:
        """``state`` as it will be written, copied (RNG states as they are now included)."""
        return _snapshot(_payload(state))

    def write(self, payload: dict[str, Any]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(payload,), name="server-state-writer", daemon=True)
        self._thread.start()

    def _write(self, payload: dict[str, Any]) -> None:
        try:
            save_torch(self.out / STATE_FILE, payload)
        except BaseException as exc:  # raised in the ServerApp's thread by the next save or wait
            self._error = exc

    def wait(self) -> None:
        """Until the last state is on disk; re-raises what made its write fail."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load_state(out: Path) -> ServerState | None:
    path = out / STATE_FILE
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot resume: {path} is unreadable ({type(exc).__name__})") from exc
    torch.set_rng_state(payload["torch_rng"])
    _set_numpy_state(payload["numpy_rng"])
    _set_python_state(payload["python_rng"])
    return ServerState(
        round=int(payload["round"]),
        arrays=payload["arrays"],
        fusion=payload["fusion"],
        pending_fused=payload["pending_fused"],
        best_top1=float(payload["best_top1"]),
        elapsed_s=float(payload["elapsed_s"]),
    )


# RNG states as plain containers, so the file stays loadable with weights_only=True.
def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["cached"]))


def _python_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _set_python_state(state: dict[str, Any]) -> None:
    random.setstate((state["version"], tuple(state["internal"]), state["gauss"]))
