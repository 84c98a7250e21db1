"""The benchmark command, on its tiny setting: every figure is produced from real runs and
rendered. (What the figures are on real settings: BENCHMARKS.md; benchmarks are not tests.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.write import startup_section, summary_rows

ROOT = Path(__file__).resolve().parents[1]
needs_fashion = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                   reason="needs Debian's dataset-fashion-mnist package")


@pytest.mark.slow
@needs_fashion
def test_the_benchmark_command_measures_and_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    text = out.read_text()
    for section in ("1a Client training throughput", "1b Server overhead", "1c Flower runtime overhead",
                    "1d Bytes on the wire", "1e Peak memory", "1f Deployment", "3 Scale", "4 CUDA"):
        assert f"## {section}" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["throughput"]["images_per_s"]["ours"] > 0 and data["throughput"]["images_per_s"]["plain"] > 0
    assert all(fig["ours_images_per_s"] > 0 and fig["default_layout_images_per_s"] > 0
               for fig in data["forward"].values()) and set(data["forward"]) == {"evaluate", "recalibrate"}
    assert [r["fusion_applied"] for r in data["runtime"]["rounds"]] == [0, 1]  # the real fusion was timed
    assert data["runtime"]["memory"]["peak_rss_bytes"]["server"] > 0
    assert data["startup"]["steps_s"]["torch"] > 0
    assert data["startup"]["torch_optimiser_s"] > 0 and data["startup"]["steps_s"]["the first optimiser and step"] > 0
    assert data["startup"]["full_data"]["decoded_s"] > 0 and data["startup"]["full_data"]["mapped_s"] > 0
    assert 0 < data["checkpoint"]["blocking_ms"] and 0 < data["checkpoint"]["write_ms"]
    assert data["scale"][0]["replies"] == data["scale"][0]["per_round"]
    assert data["settings"]["tiny"] is True


def test_each_target_is_marked_met_or_missed_from_its_number() -> None:
    data = {
        "throughput": {"ratio": 0.96},
        "fusion": {"ratio": 1.4},
        "runtime": {"server_share_max": 0.04, "runtime_ratio": 1.2},
        "wire": {"trained": {"ratio": 1.0002}},
    }
    rows = summary_rows(data)
    marks = [row.rsplit("|", 2)[-2].strip() for row in rows[:5]]
    assert marks == ["**met**", "**met**", "**missed**", "**missed**", "**met**"]
    assert "pending" in rows[5]  # CUDA, until a GPU measures it


def test_the_start_up_figures_show_torchs_optimiser_against_ours_where_measured() -> None:
    startup = {"steps_s": {"torch": 1.5, "data split and loaders": 0.02, "the first optimiser and step": 0.01},
               "total_s": 3.1, "uncached_split_s": 1.3, "torchvision_s": 1.4, "torch_optimiser_s": 1.18,
               "before_total_s": 6.2, "epoch_s": 2.9}
    text = "\n".join(startup_section({"startup": startup}))
    assert "the first optimiser and step 1.18 s -> 0.01 s" in text and "| the first optimiser and step | 0.01 |" in text
    del startup["torch_optimiser_s"]  # raw data from before that cut
    assert "-> 0.01 s" not in "\n".join(startup_section({"startup": startup}))


def cuda_figures(ours_128: float, fusion_ratio: float) -> dict:
    def epoch(ours: float) -> dict:
        ips = {"plain": 1000.0, "plain_channels_last": 1200.0, "ours_without_fast_path": 990.0,
               "ours_eager": 1190.0, "ours": ours}
        return {"images_per_epoch": 18000, "images_per_s": ips}

    return {"date": "2026-11-26", "repeats": 3, "command": "python -m benchmarks --cuda --repeats 3", "seconds": 90.0,
            "machine": {"gpu": "NVIDIA H100 80GB HBM3", "cores": 16, "python": "3.12", "torch": "2.11", "flwr": "1.42.0"},
            "training": {"32": epoch(5000.0), "128": epoch(ours_128)},
            "evaluation": {"256": {"ours_images_per_s": 9e4, "plain_images_per_s": 1e5, "ratio": 0.9}},
            "fusion": {"ratio": fusion_ratio, "bare_forward_ms": 3.0, "bare_backward_ms": 6.0, "fuse_ms": 3.5,
                       "learn_ms": 7.0},
            "recalibration": {"images": 18000, "preset_batches": 32, "batch_size": 128, "samples": 9,
                              "seconds": {"update_bn": 2.25, "ours_eager": 0.9, "ours": 0.45,
                                          "ours_preset_eager": 0.225, "ours_preset": 0.1125}}}


def test_the_gpu_figures_are_marked_against_their_targets_and_name_their_card() -> None:
    from benchmarks.write import cuda_section, cuda_summary_rows

    met = cuda_summary_rows({"cuda": cuda_figures(ours_128=16_000.0, fusion_ratio=1.2)})
    missed = cuda_summary_rows({"cuda": cuda_figures(ours_128=9_000.0, fusion_ratio=1.4)})
    assert [row.rsplit("|", 2)[-2].strip() for row in met] == ["**met**", "**met**"]
    assert [row.rsplit("|", 2)[-2].strip() for row in missed] == ["**missed**", "**missed**"]
    text = "\n".join(cuda_section({"cuda": cuda_figures(16_000.0, 1.2)}))
    assert "NVIDIA H100 80GB HBM3" in text and "torch 2.11" in text
    assert "| **ours** (channels_last, recorded step) | 16,000 | 16.00 |" in text
    # A recalibration set against the same client's training epoch: 18,000 images at 16,000 img/s.
    assert "| ours, eager, the gpu preset's `recalibrate-batches` | 32 | 0.225 | 0.20 |" in text
    assert "| **ours**, recorded, the gpu preset's `recalibrate-batches` | 32 | 0.113 | 0.10 |" in text
    assert "4e" not in text  # older raw data did not measure the card's sharing
    assert "default layout |" not in text.split("### 4d")[1]  # nor recalibration in the default layout
    figures = cuda_figures(16_000.0, 1.2)
    figures["recalibration"]["seconds"]["ours_default_layout"] = 0.36
    text = "\n".join(cuda_section({"cuda": figures}))
    assert "| ours, recorded, default layout | all | 0.360 | 0.32 |" in text
    assert "| 256 | 90,000 | 100,000 | 0.90 |\n" in text  # no evaluation in channels_last in older raw data
    figures["evaluation"]["256"]["ours_channels_last_images_per_s"] = 95_000.0
    text = "\n".join(cuda_section({"cuda": figures}))
    assert "| 256 | 90,000 | 100,000 | 0.90 | 95,000 |" in text


def test_the_sharing_figures_read_as_images_per_second_against_one_process() -> None:
    from benchmarks.write import cuda_section

    figures = cuda_figures(16_000.0, 1.2) | {"sharing": {
        "models": 3, "steps": 200, "batch_size": 128,
        "images_per_s": {"one_process": 20_000.0, "processes": 19_000.0, "streams": 31_000.0},
        "vs_one_process": {"processes": 0.95, "streams": 1.55}}}
    text = "\n".join(cuda_section({"cuda": figures}))
    assert "| 3 processes side by side, one student each | 19,000 | 0.95 |" in text
    assert "| 3 students in one process, one CUDA stream each | 31,000 | 1.55 |" in text
    assert "CUDA MPS: not measured" in text  # this machine had no MPS
    figures["sharing"]["mps"] = "no nvidia-cuda-mps-control on the PATH"
    assert "CUDA MPS: not measured (no nvidia-cuda-mps-control on the PATH)." in cuda_section({"cuda": figures})
    figures["sharing"]["images_per_s"]["processes_mps"] = 40_000.0
    figures["sharing"]["vs_one_process"]["processes_mps"] = 2.0
    text = "\n".join(cuda_section({"cuda": figures}))
    assert "| the same under CUDA MPS | 40,000 | 2.00 |" in text and "not measured" not in text
    # A measurement in one process that hung is a row that says so; one that ran, a figure.
    del figures["sharing"]["images_per_s"]["streams"], figures["sharing"]["vs_one_process"]["streams"]
    figures["sharing"]["images_per_s"]["one_stream"] = 20_500.0
    figures["sharing"]["vs_one_process"]["one_stream"] = 1.025
    figures["sharing"]["failed"] = {"streams": "it failed or ran past 75 s (exit code None)"}
    text = "\n".join(cuda_section({"cuda": figures}))
    assert "| 3 students in one process, all on one stream | 20,500 | 1.02 |" in text
    assert "| 3 students in one process, one CUDA stream each | no figure | it failed or ran past 75 s (exit code None) |" in text
    # A run its time limit stopped says so under the figures it did measure.
    assert "Stopped part way" not in text
    figures["sharing"]["stopped"] = "by a SIGTERM (a time limit) before every figure was measured"
    assert ("Stopped part way, by a SIGTERM (a time limit) before every figure was measured: the figures "
            "above are those measured before.") in cuda_section({"cuda": figures})


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")
def test_the_sharing_benchmark_without_a_gpu_is_one_line_and_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.sharing"], cwd=ROOT, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: this benchmark needs a CUDA GPU, and torch sees none here"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")
def test_a_training_process_that_fails_stops_the_side_by_side_measurement_with_the_exit_codes() -> None:
    """Without a GPU each process fails to record its step: the measurement says so at once,
    instead of the others waiting for it at the barrier."""
    from benchmarks import sharing

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"a process failed or ran past 120 s \(exit codes \[.*1.*\]\)"):
        sharing.in_processes(2, count=1, timeout=120, env={"FEDMERGENET_TEST": "1"})
    assert time.monotonic() - start < 100
    assert "FEDMERGENET_TEST" not in os.environ  # the children's environment, not this process's


def test_processes_that_outlive_their_kill_are_waited_for_once_not_each_in_turn(monkeypatch) -> None:
    """Killed processes stuck in the driver (MPS clients) can take long to go: the measurement
    waits for them all within one short deadline, so the time limit that stopped it still holds."""
    import queue

    from benchmarks import sharing

    class Stuck:  # a process that failed, and that no kill ends in time
        exitcode = 1

        def __init__(self, **_) -> None: ...
        def start(self) -> None: ...
        def kill(self) -> None: ...
        def is_alive(self) -> bool: return True
        def join(self, timeout: float) -> None: time.sleep(timeout)

    class Context:  # a multiprocessing context's three methods, by their names
        def Barrier(self, parties: int) -> None: ...
        def Queue(self) -> queue.Queue: return queue.Queue()
        def Process(self, **kwargs) -> Stuck: return Stuck(**kwargs)

    monkeypatch.setattr(sharing.mp, "get_context", lambda method: Context())
    monkeypatch.setattr(sharing, "KILLED_JOIN_S", 0.6)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="a process failed"):
        sharing.in_processes(3, count=1)
    assert time.monotonic() - start < 3.0  # one 1 s poll, then 0.6 s for all three, not 3 x 30 s


def test_a_sharing_run_stopped_by_its_time_limit_says_where_it_was(tmp_path: Path) -> None:
    """A time limit's SIGTERM ends the benchmark with its exit code, after writing where every
    thread was and the figures measured so far: here a measurement (stood in for: it needs a
    GPU) that waits."""
    started = tmp_path / "started"
    script = f"""
import sys, time, torch
import benchmarks.__main__
from benchmarks import sharing
torch.cuda.is_available = lambda: True
benchmarks.__main__.machine = lambda: {{"gpu": "a stand-in"}}
def waiting_measurement(models, count, figures):
    figures["images_per_s"] = {{"one_process": 19000.0}}
    open({str(started)!r}, "w").close()
    time.sleep(60)
sharing.measure = waiting_measurement
sys.exit(sharing.main([]))
"""
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.terminate()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + 15, err[-2000:]
    assert "most recent call first" in err and "in waiting_measurement" in err
    # What it measured before is still written, marked as stopped, with its machine.
    figures = json.loads(out)
    assert figures["images_per_s"] == {"one_process": 19000.0}
    assert figures["stopped"].startswith("by a SIGTERM") and "machine" in figures


def test_the_sharing_benchmark_logs_each_figure_as_soon_as_it_is_measured(monkeypatch, capsys) -> None:
    """With the measurements stood in for (they need a GPU): each figure reaches stderr when it is
    measured, so a time limit that stops the benchmark before its JSON still leaves the figures
    before it in the log."""
    from benchmarks import sharing

    def in_a_child(models, count, batch_size, timeout):
        raise RuntimeError(f"it failed or ran past {timeout:.0f} s (exit code None)")

    monkeypatch.setattr(sharing, "in_one_process", lambda models, count, batch_size: 1000.0 * models)
    monkeypatch.setattr(sharing, "in_processes", lambda processes, count, batch_size, **_: 900.0)
    monkeypatch.setattr(sharing, "in_a_child", in_a_child)
    monkeypatch.setattr(sharing.shutil, "which", lambda name: None)  # no MPS here
    figures = sharing.measure(models=3, count=5)
    assert capsys.readouterr().err.splitlines() == [
        "one_process: measuring", "one_process: 1,000 images/s", "processes: measuring", "processes: 900 images/s",
        "one_stream: measuring", "one_stream: it failed or ran past 75 s (exit code None)"]
    assert figures["vs_one_process"] == {"processes": 0.9}
    assert figures["failed"] == {"one_stream": "it failed or ran past 75 s (exit code None)"}
    assert figures["mps"] == "no nvidia-cuda-mps-control on the PATH"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")
def test_students_in_a_process_of_their_own_that_fails_are_reported_at_once() -> None:
    """Without a GPU the child cannot record its students: the measurement says so with its
    exit code long before its time limit."""
    from benchmarks import sharing

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"it failed or ran past 120 s \(exit code 1\)"):
        sharing.in_a_child(2, count=1, timeout=120)
    assert time.monotonic() - start < 100


def test_the_sharing_benchmark_says_why_mps_was_not_measured(monkeypatch, capsys) -> None:
    """A daemon that does not start, and processes that cannot use one that did, are told apart
    in the figures (the MPS processes stood in for: they need a GPU)."""
    from contextlib import nullcontext

    from benchmarks import sharing

    def processes(processes, count, batch_size, env=None, **_):
        if env is not None:
            raise RuntimeError("a process failed or ran past 90 s (exit codes [None, None, None])")
        return 900.0

    monkeypatch.setattr(sharing, "in_one_process", lambda models, count, batch_size: 1000.0 * models)
    monkeypatch.setattr(sharing, "in_a_child", lambda models, count, batch_size, timeout: 1000.0)
    monkeypatch.setattr(sharing, "in_processes", processes)
    monkeypatch.setattr(sharing.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(sharing, "private_mps", lambda: nullcontext(None))
    assert sharing.measure(models=3, count=5)["mps"] == "its daemon did not start"
    monkeypatch.setattr(sharing, "private_mps", lambda: nullcontext({"CUDA_MPS_PIPE_DIRECTORY": "/tmp/pipe"}))
    figures = sharing.measure(models=3, count=5)
    assert figures["mps"].startswith("its processes failed: a process failed or ran past 90 s")
    assert not {"processes_mps", "processes_mps_x2"} & set(figures["images_per_s"])
    assert "processes_mps: its processes failed" in capsys.readouterr().err


def test_under_mps_twice_as_many_processes_are_measured_under_the_same_daemon(monkeypatch) -> None:
    """Whether more jobs side by side gain under MPS: after the ``models`` processes, twice as
    many, with the same daemon's environment (the processes stood in for: they need a GPU)."""
    from contextlib import nullcontext

    from benchmarks import sharing

    seen: list[tuple[int, dict | None]] = []

    def processes(processes, count, batch_size, env=None, **_):
        seen.append((processes, env))
        return 900.0 if env is None else 1100.0 * processes / 3

    mps_env = {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/pipe"}
    monkeypatch.setattr(sharing, "in_one_process", lambda models, count, batch_size: 1000.0)
    monkeypatch.setattr(sharing, "in_a_child", lambda models, count, batch_size, timeout: 1000.0)
    monkeypatch.setattr(sharing, "in_processes", processes)
    monkeypatch.setattr(sharing.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(sharing, "private_mps", lambda: nullcontext(mps_env))
    figures = sharing.measure(models=3, count=5)
    assert seen == [(3, None), (3, mps_env), (6, mps_env)]
    assert figures["vs_one_process"]["processes_mps_x2"] == pytest.approx(2.2)
    assert figures["failed"] == {}


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_trainings_sharing_the_card_are_each_timed_to_the_end_of_their_work() -> None:
    from benchmarks import sharing

    figures = sharing.measure(models=2, count=20)
    ips = figures["images_per_s"]
    assert all(0 < value < 1e6 for value in ips.values())
    assert figures["vs_one_process"]["streams"] == pytest.approx(ips["streams"] / ips["one_process"])
    assert figures["vs_one_process"]["processes"] == pytest.approx(ips["processes"] / ips["one_process"])
    assert set(ips) in ({"one_process", "processes", "streams"}, {"one_process", "processes", "processes_mps", "streams"})
    assert (figures["mps"] == "measured") == ("processes_mps" in ips)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_figures_without_a_gpu_are_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--cuda", "--out", str(tmp_path / "B.md")], cwd=ROOT,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --cuda needs a CUDA GPU, and torch sees none here"]
    assert not (tmp_path / "B.md").exists()


def test_a_run_without_a_gpu_keeps_the_gpu_figures_already_measured(tmp_path: Path) -> None:
    from benchmarks.__main__ import earlier_cuda

    raw = tmp_path / "benchmarks.json"
    assert earlier_cuda(raw) == {}
    raw.write_text(json.dumps({"throughput": {}, "cuda": cuda_figures(16_000.0, 1.2)}))
    assert earlier_cuda(raw)["cuda"]["machine"]["gpu"] == "NVIDIA H100 80GB HBM3"
    raw.write_text(json.dumps({"cuda": cuda_figures(16_000.0, 1.2), "cuda_sharing": {"models": 3}}))
    assert set(earlier_cuda(raw)) == {"cuda", "cuda_sharing"}
    raw.write_text("{not json")
    assert earlier_cuda(raw) == {}


def test_sharing_figures_from_another_gpu_machine_join_the_report_naming_their_card(tmp_path: Path) -> None:
    """``python -m benchmarks.sharing`` ran on a lent H200, section 4 on an H100: ``--add-sharing``
    puts 4e into the raw data and BENCHMARKS.md under its own card; a file that is not that
    output, or one stopped before its reference figures, is one line and exit 2, and changes
    nothing."""
    from benchmarks.__main__ import main

    raw, out, figures = tmp_path / "benchmarks.json", tmp_path / "BENCHMARKS.md", tmp_path / "sharing.json"
    raw.write_text((ROOT / "benchmarks" / "benchmarks.json").read_text())  # a full run's raw data
    figures.write_text(json.dumps({
        "models": 3, "steps": 200, "batch_size": 128, "mps": "measured",
        "images_per_s": {"one_process": 20_000.0, "processes": 19_000.0, "processes_mps": 25_000.0,
                         "processes_mps_x2": 27_000.0},
        "vs_one_process": {"processes": 0.95, "processes_mps": 1.25, "processes_mps_x2": 1.35},
        "failed": {"streams": "it failed or ran past 75 s (exit code None)"},
        "date": "2026-11-27", "command": "python -m benchmarks.sharing", "note": "Hung: see the README.",
        "machine": {"gpu": "NVIDIA H200", "cores": 16, "torch": "2.11.0+cu130"}}))
    assert main(["--add-sharing", str(figures), "--json", str(raw), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Measured apart from the figures above, 2026-11-27 on NVIDIA H200 (16 CPU cores)" in text
    assert "| the same under CUDA MPS | 25,000 | 1.25 |" in text
    assert "| 6 processes under CUDA MPS | 27,000 | 1.35 |" in text
    assert "| 3 students in one process, one CUDA stream each | no figure | it failed or ran past 75 s" in text
    assert "\nHung: see the README.\n" in text
    assert json.loads(raw.read_text())["cuda_sharing"]["machine"]["gpu"] == "NVIDIA H200"

    before = raw.read_text(), out.read_text()
    stopped_early = {**json.loads(figures.read_text()), "images_per_s": {"one_process": 20_000.0},
                     "stopped": "by a SIGTERM (a time limit) before every figure was measured"}
    for wrong, error in (({"models": 3}, "is not benchmarks.sharing's output"),
                         (stopped_early, "was stopped before its reference figures")):
        figures.write_text(json.dumps(wrong))
        result = subprocess.run([sys.executable, "-m", "benchmarks", "--add-sharing", str(figures), "--json", str(raw),
                                 "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=120)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and error in result.stderr
        assert (raw.read_text(), out.read_text()) == before


def test_the_recalibration_studys_statistics_over_n_batches_are_recalibrate_bns_over_them() -> None:
    """The study keeps every batch's own statistics and averages N of them: what recalibrate_bn
    (and torch's update_bn) computes over those N batches."""
    import torch

    from benchmarks.recalibration import averaged, batch_statistics
    from fedmergenet.models import build_student
    from fedmergenet.training import bn_statistics, recalibrate_bn

    torch.manual_seed(0)
    model = build_student(num_classes=10)
    batches = [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    per_batch = batch_statistics(model, batches)
    recalibrate_bn(model, batches[:2], torch.device("cpu"))
    expected = bn_statistics(model)
    ours = averaged(per_batch[:2])
    assert len(per_batch) == 3 and set(ours) == set(expected)
    # The same forwards in the same layout: equal but for the order of the averaging's sums.
    assert all((ours[name] - expected[name]).norm() <= 1e-6 * expected[name].norm() for name in expected)


@pytest.mark.parametrize("args, error", [
    (["--rounds", "0"], "error: --rounds must be at least 1 (got 0)"),
    (["--alpha", "-1"], "error: --alpha must be > 0 (got -1.0); leave it out for IID partitions"),
])
def test_the_recalibration_study_refuses_bad_settings_in_one_line(args: list[str], error: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.recalibration import main

    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [error]


@pytest.mark.slow
@needs_fashion
def test_the_recalibration_study_evaluates_each_batch_count_against_the_whole_split(tmp_path: Path) -> None:
    out = tmp_path / "recalibration.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.recalibration", "--tiny", "--rounds", "1",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    whole = data["whole_split"]["batches"]
    assert min(data["whole_split"]["batches_per_client"]) == whole
    assert whole >= 5 and set(data["by_batches"]) == {str(n) for n in (2, 4, 8, 16, 32, 64) if n < whole}
    for n, row in data["by_batches"].items():
        assert len(row["draws"]) == min(4, whole // int(n))
        assert all(0 <= d["top1"] <= 1 and 0 < d["stat_error"] < 1 for d in row["draws"])
    assert 0 <= data["without_recalibration"]["top1"] <= 1 and data["setting"]["tiny"] is True


def test_a_messages_conversions_are_timed_against_flowers_own_and_rendered_in_1d() -> None:
    from benchmarks.measure import array_conversions
    from benchmarks.write import conversion_lines
    from fedmergenet.models import build_student

    figures = array_conversions(build_student(num_classes=10).state_dict(), repeats=3)
    assert set(figures) == {"read", "write", "load"}
    for row in figures.values():
        assert row["flower_ms"] > 0 and row["ours_ms"] > 0
        assert row["speedup"] == pytest.approx(row["flower_ms"] / row["ours_ms"])
    text = "\n".join(conversion_lines({"conversions": figures}))
    assert "| read every tensor's values (`Array.numpy()` / `values`) |" in text
    assert f"{figures['load']['speedup']:.1f}x |" in text
    assert conversion_lines({"initial": {}, "trained": {}}) == []  # raw data from before these figures
