"""The ServerApp's round loop against the real ClientApp, delivered in this process: where each
round's BatchNorm recalibration travels changes the number of messages, never the results.
(Flower's runtimes carry the same messages in test_e2e.py and test_reliability.py.)"""

from __future__ import annotations

import copy
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedmergenet.config import RunConfig
from fedmergenet.flower import client_app, server_app
from fedmergenet.flower.server_app import FederatedRun
from fedmergenet.results import read_metrics, read_summary

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread", "task_identity"),
              pytest.mark.skipif(not FASHION.is_dir(), reason="needs dataset-fashion-mnist")]


class InProcessGrid:
    """The part of Flower's Grid the round loop uses, handing every message (a copy, as a
    transport would) to the ClientApp of its node in this process and keeping the reply."""

    def __init__(self, cfg: RunConfig) -> None:
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=cfg.to_run_config(),
                          node_config={"partition-id": node - 1, "num-partitions": cfg.num_clients, "device": "cpu"})
            for node in range(1, cfg.num_clients + 1)}
        self.replies: dict[str, Message] = {}
        self.sent: Counter[str] = Counter()  # messages by type

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do
            self.sent[msg.metadata.message_type] += 1
            reply = client_app.app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id])
            self.replies[msg.metadata.message_id] = copy.deepcopy(reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]


class DepartingGrid(InProcessGrid):
    """Every node leaves once it has answered the first train phase."""

    def get_node_ids(self) -> list[int]:
        return [] if self.sent["train"] else super().get_node_ids()


def tiny(tmp_path: Path, **options) -> RunConfig:
    return RunConfig(**{**dict(dataset="fashion-mnist", train_limit=48, test_limit=32, rounds=2, local_epochs=1,
                               num_clients=2, batch_size=16, fusion_start_round=1, adapter_layers=1,
                               random_teacher=True, device="cpu", server_device="cpu", output_dir=str(tmp_path)),
                        **options})


def run(tmp_path: Path, grid_type: type[InProcessGrid] = InProcessGrid, **options) -> tuple[list[dict], Counter[str]]:
    cfg = tiny(tmp_path, **options)
    grid = grid_type(cfg)
    FederatedRun(cfg).run(grid)
    return read_metrics(tmp_path), grid.sent


def test_recalibration_carried_by_the_next_train_message_evaluates_every_round_as_an_evaluate_phase_does(
        tmp_path: Path) -> None:
    phases, phases_sent = run(tmp_path / "phases", skip_federated_eval=False)
    folded, folded_sent = run(tmp_path / "folded", skip_federated_eval=True)

    assert phases_sent == {"train": 4, "evaluate": 4}
    assert folded_sent == {"train": 4, "evaluate": 2}  # one evaluate phase, for the last round
    assert [r["round"] for r in folded] == [r["round"] for r in phases] == [0, 1, 2]
    assert [r["bn_recalibrated"] for r in folded] == [r["bn_recalibrated"] for r in phases] == [0, 2, 2]
    assert [r["fusion_applied"] for r in folded] == [0, 1, 1]
    assert [r["adapter_learned"] for r in folded] == [r["adapter_learned"] for r in phases] == [0, 0, 1]
    for a, b in zip(phases, folded):  # the same models, evaluated with the same statistics
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-6, abs=1e-9), a["round"]
        assert b["test_top1"] == a["test_top1"]
        assert b["train_loss"] == a["train_loss"]
        assert b["adapter_loss"] == a["adapter_loss"]
    # Each round starts after the one before, and its row is written after it starts.
    starts = [r["round_start_s"] for r in folded[1:]]
    assert starts == sorted(starts) and all(r["round_start_s"] < r["wall_time_s"] for r in folded[1:])
    assert folded[0]["round_start_s"] is None
    # The slowest client's own training time: what a round's span is measured against.
    assert all(0 < r["slowest_client_train_s"] < r["wall_time_s"] - r["round_start_s"] for r in folded[1:])
    assert folded[0]["slowest_client_train_s"] is None
    # The client's whole train function holds its recalibration and its training.
    assert all(r["slowest_client_total_s"] >= r["slowest_client_train_s"] for r in folded[1:])
    # The train phase's exchange holds that function, and the round's span holds the exchange.
    spans = [b - a for a, b in zip(starts, starts[1:])]
    assert all(r["train_exchange_s"] >= r["slowest_client_total_s"] for r in folded[1:])
    assert all(r["train_exchange_s"] < span for r, span in zip(folded[1:], spans))
    # Along its last reply the exchange adds up: out to the client, the client's side (its
    # function within), back to the server, the server unpacking.
    for r in folded[1:]:
        parts = [r[key] for key in ("train_dispatch_s", "train_last_client_s", "train_return_s", "train_unpack_s")]
        assert all(part >= 0 for part in parts) and sum(parts) == pytest.approx(r["train_exchange_s"], abs=0.05)
        assert 0 < r["train_last_function_s"] <= r["train_last_client_s"]
    # Each evaluation records how long it waited for the previous round's state to reach the disk.
    assert all(0 <= r["state_wait_ms"] < 1000 * r["wall_time_s"] for r in folded)
    # Round 1's clients start from the initial model, whose statistics need no recomputing.
    assert folded[1]["slowest_client_recalibrate_s"] < 0.01 < folded[2]["slowest_client_recalibrate_s"]
    assert read_summary(tmp_path / "folded")["round_times"]["rounds"] == 1  # round 2's span has no end
    # Only the server evaluates when told to skip the clients' evaluation: they do not either.
    assert all(r["fed_eval_top1"] is None for r in folded)
    assert all(r["fed_eval_top1"] is not None for r in phases[1:])


def test_the_server_evaluates_each_round_while_the_next_phases_clients_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A round's evaluation waits for the next phase's messages to go out, so that it runs while
    the clients work, not between their phases; every round is still evaluated, in order."""
    events: list[str] = []

    class RecordingGrid(InProcessGrid):
        def push_messages(self, messages: Iterable[Message]) -> list[str]:
            messages = list(messages)
            events.append(f"send {messages[0].metadata.message_type}")
            return super().push_messages(messages)

    evaluate = server_app.evaluate

    def recorded(model, loader, device, desc: str = "eval"):
        events.append(desc.replace("server eval ", ""))
        return evaluate(model, loader, device, desc=desc)

    monkeypatch.setattr(server_app, "evaluate", recorded)
    rows, _ = run(tmp_path, RecordingGrid, skip_federated_eval=True)

    assert events == ["send train", "round 0", "send train", "send evaluate", "round 1", "round 2"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert torch.load(tmp_path / "server_state.pt", weights_only=True)["round"] == 2


def test_a_run_resumed_from_a_state_saved_while_the_next_round_trained_continues_as_if_never_stopped(
        tmp_path: Path) -> None:
    """Round 1's state is copied before round 2's aggregation teaches the adapter, but written
    while round 3 trains. A server lost after that write resumes from round 1 and repeats rounds 2
    and 3 exactly as the run that was never stopped: the state holds no later adapter update."""

    class Lost(Exception):
        pass

    class LostInRound3(InProcessGrid):
        def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
            if self.sent["train"] == 9:  # round 3's train phase: round 1's state has just been written
                raise Lost
            return super().pull_messages(message_ids)

    whole, _ = run(tmp_path / "whole", rounds=3, skip_federated_eval=True, num_clients=3)
    cfg = tiny(tmp_path / "resumed", rounds=3, skip_federated_eval=True, num_clients=3)
    lost = FederatedRun(cfg)
    with pytest.raises(Lost):
        lost.run(LostInRound3(cfg))
    lost.states.wait()
    assert torch.load(tmp_path / "resumed" / "server_state.pt", weights_only=True)["round"] == 1
    FederatedRun(cfg.replace(resume=True)).run(InProcessGrid(cfg))
    resumed = read_metrics(tmp_path / "resumed")

    assert [r["round"] for r in resumed] == [r["round"] for r in whole] == [0, 1, 2, 3]
    assert [r["adapter_learned"] for r in resumed] == [0, 0, 1, 1]
    for a, b in zip(whole, resumed):
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-6, abs=1e-9), a["round"]
        assert b["train_loss"] == a["train_loss"] and b["adapter_loss"] == a["adapter_loss"], a["round"]


def test_a_server_lost_before_round_1_was_recorded_resumes_from_the_initial_model_without_recording_it_twice(
        tmp_path: Path) -> None:
    """Round 0's state is written while round 1 trains. A server lost then resumes from round 0:
    the initial model's row is in the results already, and rounds 1 and 2 follow it once."""

    class Lost(Exception):
        pass

    class LostInRound1(InProcessGrid):
        def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
            raise Lost  # round 1's train replies: round 0 has just been recorded

    whole, _ = run(tmp_path / "whole", skip_federated_eval=True)
    cfg = tiny(tmp_path / "resumed", skip_federated_eval=True)
    lost = FederatedRun(cfg)
    with pytest.raises(Lost):
        lost.run(LostInRound1(cfg))
    lost.states.wait()
    assert torch.load(tmp_path / "resumed" / "server_state.pt", weights_only=True)["round"] == 0
    assert [r["round"] for r in read_metrics(tmp_path / "resumed")] == [0]
    FederatedRun(cfg.replace(resume=True)).run(InProcessGrid(cfg))
    resumed = read_metrics(tmp_path / "resumed")

    assert [r["round"] for r in resumed] == [r["round"] for r in whole] == [0, 1, 2]
    for a, b in zip(whole, resumed):
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-6, abs=1e-9), a["round"]


def test_a_run_stopped_waiting_for_nodes_keeps_the_round_whose_statistics_were_still_to_come(tmp_path: Path) -> None:
    """Round 1's statistics would ride with round 2's train messages, but no node is left to
    send them to: round 1 is still evaluated (with the aggregate's own statistics) and saved."""
    rows, sent = run(tmp_path, DepartingGrid, skip_federated_eval=True, node_wait_timeout=1.0)

    assert sent == {"train": 2}
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["bn_recalibrated"] == 0 and rows[1]["fusion_applied"] == 1
    assert read_summary(tmp_path)["status"] == "stopped"
    assert torch.load(tmp_path / "server_state.pt", weights_only=True)["round"] == 1  # a resume starts at round 2


def test_a_server_app_left_by_the_process_that_started_it_stops_before_the_next_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher killed outright takes the SuperLink with it, but not a simulation's ServerApp,
    which is re-parented: it stops before training another round, its rounds so far resumable."""

    class LeftGrid(InProcessGrid):
        def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
            monkeypatch.setattr(server_app.os, "getppid", lambda: -1)  # re-parented, once round 1 is out
            return super().pull_messages(message_ids)

    rows, sent = run(tmp_path, LeftGrid, skip_federated_eval=False)

    assert sent == {"train": 2, "evaluate": 2}
    assert [r["round"] for r in rows] == [0, 1]
    summary = read_summary(tmp_path)
    assert summary["status"] == "stopped" and "has exited" in summary["error"]
    assert torch.load(tmp_path / "server_state.pt", weights_only=True)["round"] == 1
