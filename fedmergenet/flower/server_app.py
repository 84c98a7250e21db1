"""The ServerApp: load the frozen teacher, run the chosen Flower strategy with MergeNet fusion,
evaluate every round and write the results as data (metrics.jsonl per round, summary.json,
models, resumable state)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from ..atomic import save_torch
from ..config import RunConfig, validate
from ..data.splits import test_loader, train_set
from ..errors import UserError
from ..fusion import KnowledgeFusionUnit
from ..models import STUDENT_LAYER, TEACHER_LAYER, initial_student, new_student, state_checksum
from ..results import (EXCHANGE_FIELDS, append_metrics, metrics_row, read_metrics, rewrite_metrics, round_times, summarize,
                       write_summary)
from ..teacher import load_teacher, teacher_for_run
from ..training import evaluate, moved, pick_device, seed_everything
from .aggregation import build_strategy, describe
from .arrays import tensors_of
from .state import ServerState, StateWriter, load_state
from .strategy import MergeNetFusion, NodeWaitTimeout, RoundLog, spec_of
from . import wire
from .task import LOCAL_EVAL, RECALIBRATE_BN, load_arrays, run_config

app = ServerApp()


class Orphaned(RuntimeError):
    """The Flower process that started this ServerApp has exited, and with it the SuperLink."""


def check_parent(parent: int) -> None:
    """In simulation a ServerApp whose SuperLink was stopped (its launcher killed outright, say)
    would train on to its end, writing results into a folder that a resumed run may be using:
    Flower 1.42's own watch on the parent (``flwr-simulation --parent-pid``) does not stop the
    ServerApp's thread."""
    if os.getppid() != parent:
        raise Orphaned(f"the Flower process that started this ServerApp (pid {parent}) has exited")


def fusion_rounds(cfg: RunConfig) -> int:
    if not cfg.fusion:
        return 0
    return len(range(cfg.fusion_start_round, cfg.rounds + 1, cfg.fusion_frequency))


def sampling(cfg: RunConfig) -> dict[str, float | int]:
    """The strategy's sampling arguments (FedAvg's; every strategy here takes them). "Every
    client" means every client still connected, at least ``min_clients``: a run survives a
    dropout instead of waiting for the lost node."""
    if cfg.clients_per_round == 0:
        fraction, minimum = 1.0, cfg.min_available
    else:
        fraction, minimum = cfg.clients_per_round / cfg.num_clients, cfg.clients_per_round
    return {
        "fraction_train": fraction,
        # The evaluate phase also carries BatchNorm recalibration.
        "fraction_evaluate": 0.0 if cfg.skip_federated_eval and not cfg.recalibrate_bn else fraction,
        "min_train_nodes": minimum,
        "min_evaluate_nodes": minimum,
        "min_available_nodes": cfg.min_available,
    }


@dataclass
class Held:
    """A round's final global model, awaiting the server's evaluation: its resumable state as
    copied when the round ended (``StateWriter.snapshot``), the weights included."""

    round: int
    state: dict[str, Any]


class FederatedRun:
    """One federated experiment on the server side, from start-up checks to summary."""

    def __init__(self, cfg: RunConfig, parent: int | None = None) -> None:
        """``parent``: the pid of the process that started this ServerApp (see check_parent)."""
        self.cfg = validate(cfg)
        self.out = cfg.output_path()
        self.out.mkdir(parents=True, exist_ok=True)
        self.states = StateWriter(self.out)
        seed_everything(cfg.seed)
        self.start = time.time()
        self.parent = parent or os.getppid()
        self.device = pick_device(cfg.server_device)
        self.num_classes = train_set(cfg).num_classes
        # The teacher is loaded first: a bad checkpoint stops the run before any client trains.
        # Plain FedAvg needs none.
        self.teacher, self.teacher_info = None, None
        if cfg.fusion:
            self.teacher, self.teacher_info = teacher_for_run(
                path=cfg.teacher_path(), dataset=cfg.dataset, num_classes=self.num_classes,
                random=cfg.random_teacher, placebo=cfg.placebo_teacher, seed=cfg.seed, wait=cfg.await_teacher)
        self.test_loader = test_loader(cfg, self.device)
        self.student = initial_student(cfg)
        self.evaluated = new_student(cfg, self.device)  # each round's global model, evaluated where it lives
        self.fusion_unit = self._fusion_unit() if cfg.fusion else None
        self.strategy = MergeNetFusion(
            build_strategy(cfg, sampling(cfg)),
            spec=spec_of(self.student.state_dict()),
            fusion_unit=self.fusion_unit,
            fusion_start_round=cfg.fusion_start_round,
            fusion_frequency=cfg.fusion_frequency,
            max_examples=len(train_set(cfg)),
            node_wait_timeout=cfg.node_wait_timeout,
            recalibrate_bn=cfg.recalibrate_bn,
        )
        self.best_top1 = -1.0
        self._held: Held | None = None  # a round evaluated while the next phase's clients work

    def _fusion_unit(self) -> KnowledgeFusionUnit:
        teacher_matrix = self.teacher.state_dict()[TEACHER_LAYER]
        student_shape = tuple(self.student.state_dict()[STUDENT_LAYER].shape)
        return KnowledgeFusionUnit(
            teacher_matrix, student_shape, self.cfg.adapter(), total_updates=max(1, fusion_rounds(self.cfg) - 1),
            device=self.cfg.server_device, seed=self.cfg.seed,
        )

    # --- per round --------------------------------------------------------------------
    def hold(self, server_round: int, arrays: ArrayRecord) -> None:
        """Round ``server_round``'s final global model (its statistics pooled in), to be
        evaluated while the clients of the next phase work (``exchange``). Its resumable state
        is copied now: the next aggregation changes the adapter and draws random numbers."""
        self.evaluate_held()  # rounds are recorded in order
        self._held = Held(server_round, self.states.snapshot(self.state(server_round, arrays)))

    def evaluate_held(self) -> None:
        """Evaluate the held round's model; record it, save its state and the best model."""
        held, self._held = self._held, None
        if held is None:
            return
        server_round, weights = held.round, held.state["arrays"]
        self.evaluated.load_state_dict(moved(weights, self.device), strict=True)
        start = time.perf_counter()
        result = evaluate(self.evaluated, self.test_loader, self.device, desc=f"server eval round {server_round}")
        eval_ms = 1000 * (time.perf_counter() - start)
        start = time.perf_counter()
        self.states.wait()  # the previous round's state, written in the background, is on disk
        row = self.row(server_round, result, self.strategy.round_log(server_round)) | {
            "server_eval_ms": eval_ms, "state_wait_ms": 1000 * (time.perf_counter() - start),
            "layer_std": float(weights[STUDENT_LAYER].numpy().std())}
        append_metrics(self.out, row)
        if result.top1 > self.best_top1:
            self.best_top1 = result.top1
            self.student.load_state_dict(weights, strict=True)  # on the CPU, in the student's own dtypes
            save_torch(self.out / "best_model.pt", self.student.state_dict())
        self.states.write(held.state | {"best_top1": self.best_top1})  # in the background while the run goes on
        write_summary(self.out, self.summary(status="running"))
        log(INFO, "Round %s evaluate (server): %s", server_round,
            {"test-top1": result.top1, "test-top5": result.top5, "test-loss": result.loss})

    def exchange(self, grid: Grid, messages: Iterable[Message]) -> tuple[list[Message], wire.ExchangeParts | None]:
        """Send ``messages`` and return the replies, and where the exchange's time went; while
        the clients work, the server evaluates the round it holds."""
        sent = wire.send(grid, messages)
        self.evaluate_held()
        return sent.replies(self.cfg.round_timeout), sent.parts

    def row(self, server_round: int, result, log_: RoundLog) -> dict:
        status = "initial" if server_round == 0 else "ok"
        if server_round > 0 and not log_.aggregated:
            status = "no_replies" if log_.replies == 0 and log_.failures == 0 else "no_sound_update"
        train_loss = log_.train_metrics.get("train-loss")
        return metrics_row(
            epoch_equiv=server_round * self.cfg.local_epochs, top1=result.top1, top5=result.top5, loss=result.loss,
            wall_time_s=time.time() - self.start,
            round=server_round,
            # A round's row is written once its BatchNorm statistics are in, which may be during
            # the next round: its own span runs from this start to the next round's.
            round_start_s=log_.started_s,
            slowest_client_train_s=log_.slowest_train_s,
            slowest_client_recalibrate_s=log_.slowest_recalibrate_s,
            slowest_client_total_s=log_.slowest_total_s,
            train_exchange_s=log_.exchange_s,
            **exchange_fields(log_.exchange_parts),
            train_loss=train_loss,
            fed_eval_top1=log_.evaluate_metrics.get("eval-top1"),
            fed_eval_loss=log_.evaluate_metrics.get("eval-loss"),
            fusion_applied=log_.fusion_applied,
            fusion_skipped=log_.fusion_skipped,
            bn_recalibrated=log_.bn_recalibrated,
            adapter_learned=log_.learned,
            adapter_loss=log_.adapter_loss,
            adapter_lr=log_.adapter_lr,
            gate=log_.gate,
            fusion_shift=log_.fusion_shift,
            fusion_ms=log_.fusion_ms,
            aggregate_ms=log_.aggregate_ms,
            sampled=log_.sampled_train,
            replies=log_.replies,
            failures=log_.failures,
            rejected=log_.rejected,
            rejections=log_.rejections,
            round_status=status,
            bytes_down=log_.bytes_down,
            bytes_up=log_.bytes_up,
        )

    def state(self, server_round: int, arrays: ArrayRecord) -> ServerState:
        return ServerState(
            round=server_round,
            arrays=tensors_of(arrays),
            fusion=self.fusion_unit.state_dict() if self.fusion_unit else None,
            pending_fused=self.strategy.pending_fused,
            best_top1=self.best_top1,
            elapsed_s=time.time() - self.start,
        )

    def summary(self, status: str, error: str | None = None) -> dict:
        rows = read_metrics(self.out) if (self.out / "metrics.jsonl").exists() else []
        done = [r for r in rows if r["round"] > 0]
        return summarize(
            rows, arm=self.cfg.arm, status=status, error=error, wall_time_s=time.time() - self.start,
            config=self.cfg.to_run_config(), teacher=self.teacher_info.as_dict() if self.teacher_info else None,
            rounds=len(done),
            # Rounds that kept the previous model (every reply lost, late or rejected).
            rounds_without_update=sum(r["round_status"] != "ok" for r in done),
            strategy=describe(self.cfg, self.strategy.strategy),
            adapter_parameters=self.fusion_unit.num_parameters if self.fusion_unit else 0,
            round_times=round_times(rows),
        )

    # --- whole run ----------------------------------------------------------------------
    def initial_arrays(self) -> tuple[ArrayRecord, int]:
        """Fresh weights (round 0, held for evaluation), or the last recorded round's when
        resuming: a saved state's round, round 0 included, is in the results already."""
        state = load_state(self.out) if self.cfg.resume else None
        if state is None:
            for stale in ("metrics.jsonl", "server_state.pt"):
                (self.out / stale).unlink(missing_ok=True)
            arrays = ArrayRecord(self.student.state_dict())
            self.hold(0, arrays)
            return arrays, 0
        rows = [r for r in read_metrics(self.out) if r["round"] <= state.round]
        rewrite_metrics(self.out, rows)  # drop rows of a round that did not finish saving
        if self.fusion_unit is not None and state.fusion is not None:
            self.fusion_unit.load_state_dict(state.fusion)
        self.strategy.pending_fused = state.pending_fused
        self.best_top1 = state.best_top1
        self.start -= state.elapsed_s
        log(INFO, "Resuming %s after round %s", self.out, state.round)
        return ArrayRecord(state.arrays), state.round

    def run(self, grid: Grid) -> None:
        arrays, done = self.initial_arrays()
        if done >= self.cfg.rounds:
            log(INFO, "Nothing to resume: all %s rounds are done", self.cfg.rounds)
            write_summary(self.out, self.summary(status="completed"))
            return
        teacher_before = state_checksum(self.teacher.state_dict()) if self.teacher else None
        status, error = "completed", None
        try:
            arrays = self.rounds(grid, arrays, first=done + 1)
            load_arrays(self.student, arrays)
            save_torch(self.out / "final_model.pt", self.student.state_dict())
        except (NodeWaitTimeout, Orphaned) as exc:
            status, error = "stopped", str(exc)
            log(ERROR, "Stopped: %s (results so far are in %s)", exc, self.out)
        self.states.wait()  # a summary that says completed (or stopped) has its resumable state on disk
        if self.teacher and state_checksum(self.teacher.state_dict()) != teacher_before:
            raise RuntimeError("the teacher changed during the run")  # a bug, never a user error
        write_summary(self.out, self.summary(status=status, error=error))
        log(INFO, "Results: %s", self.out)

    def rounds(self, grid: Grid, arrays: ArrayRecord, first: int) -> ArrayRecord:
        """The round loop, rounds ``first``..``rounds`` (a resumed run starts after its last
        completed round). Each round: clients train, the strategy screens, aggregates and fuses;
        clients recompute BatchNorm statistics (and evaluate); the server evaluates and saves,
        while the clients of the next phase work (``hold``, ``exchange``).

        When only the server evaluates (``skip_federated_eval``), the clients recompute a round's
        statistics at the start of the next round's training, in the same message, and the round
        is evaluated then: each round costs one message per client instead of two (in deployment,
        one ClientApp process). The last round's statistics come from an evaluate phase."""
        strategy = self.strategy
        log(INFO, "Starting %s over %s, rounds %s..%s", type(strategy).__name__, type(strategy.base).__name__,
            first, self.cfg.rounds)
        strategy.summary()
        unevaluated: int | None = None  # the round whose model awaits statistics from this train phase
        try:
            for server_round in range(first, self.cfg.rounds + 1):
                check_parent(self.parent)
                log(INFO, "[ROUND %s/%s]", server_round, self.cfg.rounds)
                strategy.round_log(server_round).started_s = time.time() - self.start
                train_config = ConfigRecord({"local-epochs": self.cfg.local_epochs,
                                             RECALIBRATE_BN: unevaluated is not None})
                try:
                    messages = strategy.configure_train(server_round, arrays, train_config, grid)
                except NodeWaitTimeout:
                    if unevaluated is not None:  # its statistics will not come: the results so far still hold it
                        self.recalibrated(unevaluated, [], arrays)
                    raise
                sent = time.perf_counter()
                replies, parts = self.exchange(grid, messages)
                strategy.round_log(server_round).exchange_s = time.perf_counter() - sent
                strategy.round_log(server_round).exchange_parts = parts
                if unevaluated is not None:  # before this round's adapter update, which its state must not hold
                    self.recalibrated(unevaluated, replies, arrays)
                aggregated, metrics = strategy.aggregate_train(server_round, replies)
                if aggregated is not None:  # otherwise the round keeps the global model
                    arrays = aggregated
                    log(INFO, "Round %s train: %s", server_round, metrics)
                if self.folds_recalibration and server_round < self.cfg.rounds:
                    unevaluated = server_round
                else:
                    self.evaluate_phase(grid, server_round, arrays)
        except (NodeWaitTimeout, Orphaned):
            self.evaluate_held()  # what was done stays in the results
            raise
        self.evaluate_held()
        return arrays

    @property
    def folds_recalibration(self) -> bool:
        return self.cfg.skip_federated_eval and self.cfg.recalibrate_bn

    def recalibrated(self, server_round: int, replies: list[Message], arrays: ArrayRecord) -> None:
        """Round ``server_round``'s model with the BatchNorm statistics that the train ``replies``
        carried pooled into it (with none, the aggregate's own), held for evaluation."""
        self.strategy.recalibrate(server_round, replies, arrays)
        self.hold(server_round, arrays)

    def evaluate_phase(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> None:
        """Clients recompute the BatchNorm statistics (and evaluate, unless only the server
        does); the strategy pools them into ``arrays``, held for the server's evaluation."""
        config = ConfigRecord({LOCAL_EVAL: not self.cfg.skip_federated_eval})
        replies, _ = self.exchange(grid, self.strategy.configure_evaluate(server_round, arrays, config, grid))
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            log(INFO, "Round %s evaluate (clients): %s", server_round, metrics)
        self.hold(server_round, arrays)


def exchange_fields(parts: wire.ExchangeParts | None) -> dict[str, float | None]:
    """The train phase's exchange along its last reply (``wire.ExchangeParts``), for the row."""
    return {row: getattr(parts, field) if parts else None for field, row in EXCHANGE_FIELDS.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = run_config(context)
    if cfg.random_teacher:
        log(WARNING, "Using a random teacher: results are a smoke test, not a MergeNet result")
    arms = cfg.arm_runs()  # several arms share the nodes (and the simulation's start-up)
    parent = os.getppid()
    try:
        check_arms(arms)
        for arm_cfg in arms:
            FederatedRun(arm_cfg, parent).run(grid)
    except UserError as exc:
        log(ERROR, "error: %s", exc)
        raise SystemExit(2) from None


def check_arms(arms: list[RunConfig]) -> None:
    """Every arm's options and teacher checkpoint before the first arm trains: a bad value for
    a later arm must not cost the arms before it (each arm loads its teacher again as it starts;
    one still being pretrained is checked then)."""
    teachers: dict[Path, RunConfig] = {}
    for arm in arms:
        validate(arm)
        if arm.fusion and not arm.random_teacher and not arm.teacher_pending:
            teachers[arm.teacher_path()] = arm
    for path, arm in teachers.items():
        load_teacher(path, dataset=arm.dataset, num_classes=train_set(arm).num_classes)
