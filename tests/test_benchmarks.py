"""The benchmark command, on its tiny setting: every figure is produced from real runs and
rendered. (What the figures are on real settings: BENCHMARKS.md; benchmarks are not tests.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.write import summary_rows

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
    assert [r["fusion_applied"] for r in data["runtime"]["rounds"]] == [0, 1]  # the real fusion was timed
    assert data["runtime"]["memory"]["peak_rss_bytes"]["server"] > 0
    assert data["startup"]["steps_s"]["torch"] > 0
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
