"""What the ClientApp and ServerApp need between models and Flower records: the run's options
with their paths anchored, loading by name, sizes, dtypes for the strategies, and the round's
place in the LR schedule.

Flower's plumbing stays in the app files; this module holds no Flower control flow. The
data and the models live in fedmergenet.data and fedmergenet.models (no Flower there).
"""

from __future__ import annotations

import json
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context
from flwr.supercore.utils import get_flwr_home

from ..config import PROJECT_ROOT, RunConfig
from ..training import moved
from .arrays import as_array, tensors_of, values

# The ArrayRecord of a reply that carries the BatchNorm statistics a client recomputed for the
# global model it was sent (an evaluate reply, or a train reply when the server asks).
STATISTICS = "bn"
# The other keys of our messages beyond Flower's own ("num-examples", "server-round",
# "proximal-mu"), written on one side and read on the other. In a message's config:
RECALIBRATE_BN = "recalibrate-bn"  # recompute the sent model's BatchNorm statistics and send them
LOCAL_EVAL = "local-eval"  # evaluate on the local validation split
# In a reply's metrics: the statistics' weight when the server pools them, and the client's
# seconds of training, of recalibration and of its whole function (the server splits a round by them).
TRAIN_EXAMPLES = "train-examples"
TRAIN_SECONDS, RECALIBRATE_SECONDS, CLIENT_SECONDS = "train-seconds", "recalibrate-seconds", "client-seconds"


def run_config(context: Context) -> RunConfig:
    """The run's options, relative paths resolved against the app's folder (app_root)."""
    return RunConfig.from_run_config(context.run_config).anchored(app_root())


@cache  # one answer per process; it reads the package's install record
def app_root() -> Path:
    """The project folder the app was started from: where ``data/``, ``checkpoints/`` and
    ``results/`` of a run with relative paths live.

    ``flwr run .`` ships only the code, to ``$FLWR_HOME/apps/<app>/``, and runs it from there
    (in a process whose working folder is the SuperLink's). The project's environment holds this
    package as an editable install, whose record (PEP 610's direct_url.json) names the project
    folder. Run from the source tree, the folder is the one above this package.
    """
    if (get_flwr_home().resolve() / "apps") not in PROJECT_ROOT.parents:
        return PROJECT_ROOT
    return _editable_source("fedmergenet") or PROJECT_ROOT


def _editable_source(package: str) -> Path | None:
    try:
        record = distribution(package).read_text("direct_url.json")
    except PackageNotFoundError:
        return None
    info = json.loads(record or "{}")
    url = urlparse(info.get("url", ""))
    if not info.get("dir_info", {}).get("editable") or url.scheme != "file":
        return None
    return Path(url2pathname(url.path))


def load_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Load by name, strictly: a missing or extra tensor is an error, never silently skipped.
    The tensors reach the model's device in one copy per dtype (``moved``)."""
    device = next(model.parameters()).device
    model.load_state_dict(moved(tensors_of(arrays), device), strict=True)


def as_float(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` with integer arrays (BatchNorm's num_batches_tracked) as float64, the rest as is.

    Flower's strategies and DP helpers do arithmetic on every array, some of it in place
    (clipping scales an update by a float), which integer arrays cannot take; FedAvg turns
    them into float64 averages anyway, so nothing changes where it already worked."""
    integer = {name for name, array in arrays.items() if np.dtype(array.dtype).kind in "iub"}  # metadata only
    if not integer:
        return arrays
    return ArrayRecord({name: as_array(values(array).astype(np.float64)) if name in integer else array
                        for name, array in arrays.items()})


def scalars_from(arrays: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
    """``arrays`` with every 0-d array (BatchNorm's num_batches_tracked) taken from ``sent``.

    For DP: Flower's clipping scales an update's arrays in place, but the difference of two 0-d
    arrays is a numpy scalar, which it rebinds instead of scaling, so counters would leave a
    client unclipped (they tell how many batches it trained). BatchNorm with momentum never
    reads them; under DP they stay what the server sent."""
    return ArrayRecord({name: sent[name] if len(array.shape) == 0 else array for name, array in arrays.items()})


def with_dtypes(arrays: ArrayRecord, dtypes: dict[str, np.dtype]) -> ArrayRecord:
    """``arrays`` cast back to ``dtypes`` (integers rounded), for a reply the server screens by dtype."""
    def cast(array: Array, dtype: np.dtype) -> Array:
        if np.dtype(array.dtype) == dtype:
            return array
        current = values(array)
        return as_array(np.asarray(np.rint(current) if dtype.kind in "iu" else current).astype(dtype))

    return ArrayRecord({name: cast(array, dtypes[name]) for name, array in arrays.items()})


def record_bytes(arrays: ArrayRecord) -> int:
    """Payload size of an ArrayRecord as it travels (raw tensor bytes)."""
    return int(sum(len(array.data) for array in arrays.values()))


def global_epoch(cfg: RunConfig, server_round: int) -> int:
    """The global epoch a round starts at: its LR is the central baseline's LR at that epoch."""
    return (server_round - 1) * cfg.local_epochs
