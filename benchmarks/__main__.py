"""python -m benchmarks [--tiny] [--cuda] [--out BENCHMARKS.md]: measure, write benchmarks.json, render BENCHMARKS.md.

On a machine with CUDA the GPU figures (section 4) are measured too; ``--cuda`` measures only
those and keeps the other figures of the existing raw data (a GPU machine without Ray)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmergenet.config import PROJECT_ROOT


def machine() -> dict[str, Any]:
    import flwr
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except OSError:
        memory = 0
    return {"cpu": cpu, "cores": os.cpu_count() or 1, "memory_gib": memory / 2**30,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__}


def measure(settings) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from . import measure as m
    from . import runs, startup

    torch.set_num_threads(settings.threads)
    steps = [
        ("throughput", lambda: m.client_throughput(settings)),
        ("forward", lambda: m.forward_passes(settings)),
        ("fusion", lambda: m.fusion_step(settings)),
        ("checkpoint", lambda: m.checkpoint_write(settings)),
        ("wire", lambda: m.student_wire(m.throughput_config(settings), settings.repeats)),
        ("startup", lambda: startup.client_startup(settings)),
        ("runtime", lambda: runs.server_and_runtime(settings)),
        ("scale", lambda: runs.scale(settings)),
    ]
    data: dict[str, Any] = {}
    for name, step in tqdm(steps, desc="benchmarks", unit="figure"):
        data[name] = step()
    if torch.cuda.is_available():
        data["cuda"] = measure_cuda(settings)
    return data


def measure_cuda(settings) -> dict[str, Any]:
    """Section 4, with the machine it ran on (it may differ from the CPU figures')."""
    from . import cuda

    return cuda.measure(settings) | {"date": datetime.date.today().isoformat(), "machine": machine(),
                                     "repeats": settings.repeats}


def settings_from(args: argparse.Namespace, work_dir: Path):
    """How hard to measure, from the command line: tiny settings time each figure once."""
    from .measure import Settings

    return Settings(tiny=args.tiny, repeats=1 if args.tiny else args.repeats, threads=os.cpu_count() or 1,
                    work_dir=work_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None, help="raw data (default: benchmarks/benchmarks.json)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="smallest settings: proves every figure runs, measures nothing")
    parser.add_argument("--cuda", action="store_true", help="only the GPU figures, into the existing raw data")
    parser.add_argument("--add-sharing", type=Path, metavar="FILE",
                        help="4e as `python -m benchmarks.sharing` wrote it on a GPU machine, into the existing raw data")
    args = parser.parse_args(argv)
    json_path = args.json or (args.out.parent / "benchmarks" / "benchmarks.json" if not args.tiny
                              else args.out.with_suffix(".json"))
    if args.add_sharing:
        return add_sharing(args.add_sharing, json_path, args.out)
    if args.cuda:
        return cuda_only(args, json_path)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedmergenet-bench-") as work:
        settings = settings_from(args, Path(work))
        data = measure(settings)
    if "cuda" not in data:
        data |= earlier_cuda(json_path)
    data |= {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "command": shlex.join(["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"tiny": settings.tiny, "repeats": settings.repeats, "threads": settings.threads},
        "seconds": time.perf_counter() - start,
        "json_path": os.path.relpath(json_path, args.out.parent),
    }
    return write(data, json_path, args.out)


GPU_KEYS = ("cuda", "cuda_sharing")  # the GPU figures; 4e alone when it ran apart from the rest of section 4


def earlier_cuda(json_path: Path) -> dict[str, Any]:
    """A run without a GPU keeps the GPU figures already in the raw data (they name their own
    card, date and command) until a run on a GPU measures them again."""
    try:
        earlier = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return {}
    return {key: earlier[key] for key in GPU_KEYS if key in earlier} if isinstance(earlier, dict) else {}


SHARING_KEYS = {"models", "steps", "batch_size", "images_per_s", "vs_one_process", "mps", "date", "machine", "command"}


def add_sharing(path: Path, json_path: Path, out: Path) -> int:
    """4e measured on its own (``python -m benchmarks.sharing`` on a GPU machine), kept beside the
    raw data's section 4, which may come from another card."""
    try:
        figures = json.loads(path.read_text())
        data = json.loads(json_path.read_text())
    except (OSError, ValueError) as err:
        print(f"error: --add-sharing needs {path} (benchmarks.sharing's output) and the raw data {json_path}: {err}",
              file=sys.stderr)
        return 2
    missing = SHARING_KEYS - set(figures) if isinstance(figures, dict) else SHARING_KEYS
    if missing or not isinstance(data, dict):
        print(f"error: {path} is not benchmarks.sharing's output with its machine (missing: {', '.join(sorted(missing))})",
              file=sys.stderr)
        return 2
    if not isinstance(figures["images_per_s"], dict) or not {"one_process", "processes"} <= set(figures["images_per_s"]):
        # A run its time limit stopped early: 4e's table is read against these two.
        print(f"error: {path} was stopped before its reference figures (one process, processes side by side) "
              f"were measured: {figures.get('stopped', 'they are missing')}", file=sys.stderr)
        return 2
    data["cuda_sharing"] = figures
    return write(data, json_path, out)


def cuda_only(args: argparse.Namespace, json_path: Path) -> int:
    import torch

    if not torch.cuda.is_available():
        print("error: --cuda needs a CUDA GPU, and torch sees none here", file=sys.stderr)
        return 2
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError) as err:
        print(f"error: --cuda adds to the raw data of a full run, and {json_path} cannot be read ({err})",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedmergenet-bench-") as work:
        data["cuda"] = measure_cuda(settings_from(args, Path(work)))
    data.pop("cuda_sharing", None)  # 4e is in this run's section 4
    data["cuda"] |= {"command": shlex.join(["python", "-m", "benchmarks", "--cuda", "--repeats", str(args.repeats)]),
                     "seconds": time.perf_counter() - start}
    return write(data, json_path, args.out)


def write(data: dict[str, Any], json_path: Path, out: Path) -> int:
    from .write import render

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    out.write_text(render(data) + "\n")
    print(f"wrote {out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
