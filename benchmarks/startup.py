"""1f: what a deployment client pays per message before training starts. Flower 1.42's
SuperNode starts a fresh ``flwr-clientapp`` process for every message, which imports torch,
Flower's ClientApp runtime and our app, reads its data split and makes its optimiser. This
replays those steps in a fresh interpreter, timing each, and finishes with one local epoch for
the peak memory of a client process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmergenet.config import PROJECT_ROOT

from .measure import Settings, median

# Each step runs after the previous ones; the child prints cumulative timestamps.
CHILD = r"""
import json, resource, sys, time
marks = [("interpreter", time.perf_counter())]
import torch
marks.append(("torch", time.perf_counter()))
import flwr.supernode.runtime.run_clientapp
marks.append(("flwr ClientApp runtime", time.perf_counter()))
variant = sys.argv[3]  # "now", "before" the cuts, or "torch-sgd": now but with torch's own SGD
if variant == "before":  # what our data transforms imported (torchvision imports torch._dynamo)
    import torchvision.transforms.v2
    marks.append(("torchvision", time.perf_counter()))
import fedmergenet.flower.client_app as client_app
marks.append(("our ClientApp module", time.perf_counter()))
from fedmergenet.config import RunConfig
from fedmergenet.data.splits import client_data
cfg = RunConfig(**json.loads(sys.argv[1]))
torch.set_num_threads(cfg.client_threads)
client_data(cfg, 0, cfg.num_clients)
marks.append(("data split and loaders", time.perf_counter()))
from fedmergenet.training import make_optimizer
layer = torch.nn.Linear(1, 1)
# torch's own SGD imports its compiler (torch._dynamo) on its first call
optimizer = make_optimizer(layer) if variant == "now" else torch.optim.SGD(layer.parameters(), lr=0.1)
layer(torch.ones(1, 1)).sum().backward()
optimizer.step()
optimizer.zero_grad()
marks.append(("the first optimiser and step", time.perf_counter()))
if sys.argv[2] == "train":
    from fedmergenet.models import initial_student
    client_app.local_train(cfg, initial_student(cfg), 0, cfg.num_clients, 1, torch.device("cpu"))
    marks.append(("one local epoch", time.perf_counter()))
print(json.dumps({"marks": marks, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _child(cfg: dict[str, Any], train: bool, cache_dir: Path | None, variant: str = "now") -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    if cache_dir is not None:
        env["FEDMERGENET_CACHE_DIR"] = str(cache_dir)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), "train" if train else "start",
                             variant],
                            capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, check=True)
    total = time.perf_counter() - start
    data = json.loads(result.stdout.strip().splitlines()[-1])
    marks = data["marks"]
    steps = {name: t - previous for (name, t), (_, previous) in zip(marks[1:], marks)}
    # The interpreter's own start (and exit) is what the parent saw beyond the child's marks.
    steps = {"interpreter": total - (marks[-1][1] - marks[0][1]), **steps}
    return {"steps": steps, "total_s": total, "peak_rss_bytes": data["peak_rss_bytes"]}


def client_startup(settings: Settings) -> dict[str, Any]:
    """Median seconds per step as a message pays them now (split cached, no torchvision, our
    SGD), the same before those cuts (empty cache, torchvision imported, torch's own SGD), the
    first optimiser and step now but with torch's own SGD, and one client's peak memory."""
    cfg = {"dataset": "fashion-mnist", "train_limit": 96 if settings.tiny else 1200, "num_clients": 3,
           "batch_size": 32, "lr": 0.03, "local_epochs": 1, "client_threads": settings.threads}
    with tempfile.TemporaryDirectory(dir=settings.work_dir) as empty:
        # Before the cuts: no split cache, no decoded data, torchvision imported, torch's own
        # SGD. The first run also warms the page cache.
        cold = [_child(cfg, train=False, cache_dir=_without_decoded_data(Path(empty) / str(i)), variant="before")
                for i in range(settings.repeats)]
    if not settings.tiny:
        _child(cfg, train=False, cache_dir=None)  # the project's split cache is surely warm now
    trained = _child(cfg, train=True, cache_dir=None)
    # Every start-up before the epoch is a sample too; tiny settings take only that one. Torch's
    # own SGD alternates with ours, so a drift in the machine's speed reaches both.
    warm, torch_sgd = [trained], []
    for sample in range(settings.repeats):
        torch_sgd.append(_child(cfg, train=False, cache_dir=None, variant="torch-sgd"))
        if sample < settings.repeats - 1:
            warm.append(_child(cfg, train=False, cache_dir=None))
    steps = [name for name in trained["steps"] if name != "one local epoch"]
    return {
        "full_data": full_data_split(settings),
        "steps_s": {name: median([run["steps"][name] for run in warm]) for name in steps},
        "total_s": median([sum(run["steps"][name] for name in steps) for run in warm]),
        "uncached_split_s": median([run["steps"]["data split and loaders"] for run in cold]),
        "torchvision_s": median([run["steps"]["torchvision"] for run in cold]),
        "torch_optimiser_s": median([run["steps"]["the first optimiser and step"] for run in torch_sgd]),
        "before_total_s": median([run["total_s"] for run in cold]),
        "epoch_s": trained["steps"]["one local epoch"],
        "client_peak_rss_bytes": trained["peak_rss_bytes"],
    }


def full_data_split(settings: Settings) -> dict[str, Any]:
    """The data step on all of Fashion-MNIST (the gpu preset's data) in a fresh process: the
    split decoded from its gz files, as every message did before the decoded cache, against
    mapped from that cache (``.cache/decoded``). The partition cache is warm in both."""
    cfg = {"dataset": "fashion-mnist", "train_limit": 0, "num_clients": 3, "batch_size": 128,
           "client_threads": settings.threads}
    with tempfile.TemporaryDirectory(dir=settings.work_dir) as work:
        cache, aside = Path(work) / "cache", Path(work) / "decoded"
        _child(cfg, train=False, cache_dir=cache)  # fills both caches
        (cache / "decoded").rename(aside)
        decoded = [_child(cfg, train=False, cache_dir=_without_decoded_data(cache)) for _ in range(settings.repeats)]
        (cache / "decoded").unlink()
        aside.rename(cache / "decoded")
        mapped = [_child(cfg, train=False, cache_dir=cache) for _ in range(settings.repeats)]
    step = "data split and loaders"
    return {"decoded_s": median([run["steps"][step] for run in decoded]),
            "mapped_s": median([run["steps"][step] for run in mapped])}


def _without_decoded_data(cache: Path) -> Path:
    """A cache folder whose decoded-data entry is a file, not a folder: a child decodes the
    split every time and writes nothing there, as every message did before that cache."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "decoded").touch()
    return cache
