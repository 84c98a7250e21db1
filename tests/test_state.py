"""The server's resumable state, written in the background while the next round trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmergenet.flower.state import STATE_FILE, ServerState, StateWriter, load_state


def state(weights: torch.Tensor, moments: torch.Tensor, server_round: int) -> ServerState:
    fusion = {"adapter": {"w": weights}, "optimizer": {"state": {0: {"exp_avg": moments}}, "param_groups": [{"lr": 1e-3}]}}
    return ServerState(round=server_round, arrays={"layer": weights}, fusion=fusion, pending_fused=None,
                       best_top1=0.5, elapsed_s=1.0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_the_state_saved_is_the_rounds_even_when_training_changes_the_tensors_right_after(tmp_path: Path,
                                                                                       device: str) -> None:
    """On a GPU the adapter and its moments live there: copied to the host in one go, then saved."""
    weights, moments = torch.zeros(256, 256, device=device), torch.ones(256, 256, device=device)
    writer = StateWriter(tmp_path)
    writer.save(state(weights, moments, server_round=3))
    weights.add_(1.0)  # the next round's fusion and learning work in place at once
    moments.mul_(7.0)
    writer.wait()

    saved = load_state(tmp_path)
    assert saved is not None and saved.round == 3
    assert torch.equal(saved.arrays["layer"], torch.zeros(256, 256))
    assert torch.equal(saved.fusion["adapter"]["w"], torch.zeros(256, 256))
    assert torch.equal(saved.fusion["optimizer"]["state"][0]["exp_avg"], torch.ones(256, 256))
    assert saved.fusion["optimizer"]["param_groups"] == [{"lr": 1e-3}]


def test_each_save_waits_for_the_previous_write_and_the_last_one_wins(tmp_path: Path) -> None:
    writer = StateWriter(tmp_path)
    for server_round in range(1, 4):
        writer.save(state(torch.full((64,), float(server_round)), torch.zeros(64), server_round))
    writer.wait()
    saved = load_state(tmp_path)
    assert saved is not None and saved.round == 3 and float(saved.arrays["layer"][0]) == 3.0
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temporary file left behind


def test_a_write_that_failed_is_raised_in_the_servers_thread(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    writer = StateWriter(blocker / "out")
    writer.save(state(torch.zeros(4), torch.zeros(4), server_round=1))
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # raised once
