"""The server's whole state after a round, written atomically so a crash can resume.

Global weights, the adapter with its optimiser and schedule, the fused layer in
circulation, round number, best accuracy and RNG states. Loads with ``weights_only=True``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..atomic import save_torch

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
    payload = {
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
    save_torch(out / STATE_FILE, payload)


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
