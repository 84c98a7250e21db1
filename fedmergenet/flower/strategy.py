"""MergeNet fusion over any Flower strategy: aggregate the clients' students, then let the
adapter write teacher knowledge into one layer of the aggregate, and learn from where
training took that layer. ``FedMergeNet`` is the fusion over FedAvg.

``aggregate_train`` (the Message-API successor of ``aggregate_fit``):
1. rejects malformed replies (NaN/Inf, wrong names, shapes or dtypes, bad example counts);
2. hands the rest to the wrapped strategy (FedAvg's weighted average, FedAdam's server step,
   Krum's choice, a DP wrapper's clipped and noised average ...);
3. learns: if the model sent out this round carried a fused layer, the new average of that
   layer is where client training took it, and the adapter is pulled toward it;
4. fuses: from ``fusion_start_round`` every ``fusion_frequency`` rounds, the average's
   ``stage6.2.residual.6.weight`` is replaced by the adapter's fused layer. Every other
   tensor, BatchNorm buffers included, passes through untouched.

Then BatchNorm recalibration (``recalibrate_bn``): the clients recompute the new global
model's BatchNorm statistics on their training data and ``recalibrate`` pools them into it,
before the server evaluates it. They do so in the evaluate phase, or, when the server asks
(``recalibrate-bn`` in the train config), at the start of the next round's training, whose
replies then carry the statistics of the model they were sent next to their update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedAvgM,
    Strategy,
)

from ..fusion import KnowledgeFusionUnit
from ..models import STUDENT_LAYER
from ..training import pool_bn_statistics
from .arrays import as_array, tensors_of, values
from .task import (CLIENT_SECONDS, RECALIBRATE_BN, RECALIBRATE_SECONDS, STATISTICS, TRAIN_EXAMPLES, TRAIN_SECONDS,
                   as_float, record_bytes, scalars_from)
from .wire import ExchangeParts, wire_error


class NodeWaitTimeout(RuntimeError):
    """Too few clients connected within the allowed wait."""


@dataclass
class RoundLog:
    """What happened in one round, gathered for the round's metrics row."""

    started_s: float | None = None  # run time when the round's train messages went out
    sampled_train: int = 0
    sampled_evaluate: int = 0
    replies: int = 0
    failures: int = 0
    rejected: int = 0
    rejections: list[str] = field(default_factory=list)
    bn_recalibrated: int = 0
    aggregated: bool = False
    fusion_applied: int = 0
    fusion_skipped: int = 0
    learned: int = 0
    adapter_loss: float | None = None
    adapter_lr: float | None = None
    gate: float | None = None
    fusion_shift: float | None = None
    fusion_ms: float = 0.0
    aggregate_ms: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    train_metrics: dict[str, float] = field(default_factory=dict)
    # The slowest sound reply's own training time (a round's span over it is the round's
    # overhead) and its slowest recomputation of BatchNorm statistics, which comes first.
    slowest_train_s: float | None = None
    slowest_recalibrate_s: float | None = None
    slowest_total_s: float | None = None  # a reply's whole train function, set-up included
    # From the train messages going out to the last reply in: beyond the slowest client's whole
    # train function it is Flower's and the messages' time, or the server's evaluation of the
    # round before (it runs meanwhile) where that outlasts the clients; the rest of the span is
    # the server's.
    exchange_s: float | None = None
    exchange_parts: ExchangeParts | None = None  # that exchange along its last reply
    evaluate_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str


def spec_of(state: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes every reply must match (from the student's state_dict)."""
    return {name: TensorSpec(tuple(t.shape), str(t.dtype).replace("torch.", "")) for name, t in state.items()}


def check_count(metrics: MetricRecord, key: str, max_examples: int) -> str | None:
    """Why a reply's example count ``key`` cannot weigh it, or None when it is sound."""
    examples = metrics.get(key)
    if not isinstance(examples, (int, float)) or isinstance(examples, bool) or not math.isfinite(examples):
        return f"{key} is {examples!r}"
    if examples <= 0 or examples > max_examples:
        return f"{key} {examples} outside 1..{max_examples}"
    return None


def check_arrays(arrays: ArrayRecord, spec: dict[str, TensorSpec]) -> str | None:
    """Why ``arrays`` do not match ``spec`` name for name (shape, dtype, finite), or None."""
    missing, extra = sorted(set(spec) - set(arrays)), sorted(set(arrays) - set(spec))
    if missing or extra:
        return f"tensor names differ (missing {missing[:3]}, extra {extra[:3]})"
    for name, expected in spec.items():
        array = arrays[name]
        if tuple(array.shape) != expected.shape:
            return f"{name} has shape {tuple(array.shape)}, expected {expected.shape}"
        if array.dtype != expected.dtype:
            return f"{name} has dtype {array.dtype}, expected {expected.dtype}"
    for name, array in arrays.items():
        tensor = values(array)
        if tensor.dtype.kind == "f" and not np.isfinite(tensor).all():
            return f"{name} contains NaN or Inf"
    return None


def slowest(replies: list[Message], key: str) -> float | None:
    """The largest of the sound train replies' own timings ``key`` (in their one MetricRecord)."""
    records = (next(iter(msg.content.metric_records.values())) for msg in replies)
    return max((float(record[key]) for record in records if key in record), default=None)


def check_reply(msg: Message, spec: dict[str, TensorSpec], max_examples: int) -> str | None:
    """Why a train reply must not be averaged, or None when it is sound."""
    content = msg.content
    if (reason := wire_error(msg)) is not None:
        return reason
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return "expected exactly one ArrayRecord and one MetricRecord"
    arrays = next(iter(content.array_records.values()))
    metrics = next(iter(content.metric_records.values()))
    return check_count(metrics, "num-examples", max_examples) or check_arrays(arrays, spec)


def check_statistics(msg: Message, spec: dict[str, TensorSpec], max_examples: int) -> str | None:
    """Why a reply's BatchNorm statistics must not be pooled, or None when sound."""
    content = msg.content
    if (reason := wire_error(msg)) is not None:
        return reason
    if STATISTICS not in content.array_records or len(content.metric_records) != 1:
        return "no BatchNorm statistics"
    bn_spec = {name: s for name, s in spec.items() if name.endswith(("running_mean", "running_var"))}
    statistics = content[STATISTICS]
    reason = (check_count(next(iter(content.metric_records.values())), TRAIN_EXAMPLES, max_examples)
              or check_arrays(statistics, bn_spec))
    if reason is None and any((values(statistics[name]) < 0).any() for name in bn_spec if name.endswith("var")):
        return "a running variance is negative"
    return reason


class MergeNetFusion(Strategy):
    """MergeNet fusion on top of any Message-API strategy, composed the way Flower's DP
    wrappers are: it screens the replies, lets the wrapped strategy aggregate them (FedAvg,
    FedAdam, Krum, a DP wrapper ...), then learns and fuses on that strategy's aggregate."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        spec: dict[str, TensorSpec],
        fusion_unit: KnowledgeFusionUnit | None = None,
        fusion_start_round: int = 2,
        fusion_frequency: int = 1,
        max_examples: int = 10**8,
        node_wait_timeout: float = 300.0,
        target: str = STUDENT_LAYER,
        recalibrate_bn: bool = False,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.recalibrate_bn = recalibrate_bn
        # The global model the evaluate phase was sent: its BatchNorm statistics are replaced in
        # place by the clients' recomputed ones, before the server evaluates it and sends it on.
        self._evaluated: ArrayRecord | None = None
        self.spec = spec
        self.fusion_unit = fusion_unit
        self.fusion_start_round = fusion_start_round
        self.fusion_frequency = fusion_frequency
        self.max_examples = max_examples
        self.node_wait_timeout = node_wait_timeout
        self.target = target
        # The fused layer inside the global model now in circulation, until it is learned from.
        self.pending_fused: torch.Tensor | None = None
        self.rounds: dict[int, RoundLog] = {}
        self.private = privatised(strategy)
        self._sent: ArrayRecord | None = None  # the global model this round's clients trained from
        self._statistics_asked = False  # whether this round's train replies carry BatchNorm statistics

    @property
    def base(self) -> Strategy:
        """The aggregation strategy inside every wrapper (DP's included)."""
        return innermost(self.strategy)

    def summary(self) -> None:
        log(INFO, "\t├──> MergeNet fusion: %s", "on" if self.fusion_unit is not None else "off")
        if self.fusion_unit is not None:
            log(INFO, "\t│\t├── Layer: %s", self.target)
            log(INFO, "\t│\t└── From round %s, every %s round(s)",
                self.fusion_start_round, self.fusion_frequency)
        self.strategy.summary()

    def round_log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog())

    def fuses_in(self, server_round: int) -> bool:
        return (
            self.fusion_unit is not None
            and server_round >= self.fusion_start_round
            and (server_round - self.fusion_start_round) % self.fusion_frequency == 0
        )

    # --- sending ----------------------------------------------------------------------
    def wait_for_nodes(self, grid: Grid, needed: int) -> None:
        """Flower waits forever for the minimum of nodes; we wait a bounded time and say so."""
        deadline = time.monotonic() + self.node_wait_timeout
        while (connected := len(list(grid.get_node_ids()))) < needed:
            if time.monotonic() > deadline:
                raise NodeWaitTimeout(
                    f"only {connected} of the {needed} required clients connected within "
                    f"{self.node_wait_timeout:.0f} s; start more clients or lower --min-clients"
                )
            time.sleep(1.0)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        base = self.base
        self.wait_for_nodes(grid, max(base.min_available_nodes, base.min_train_nodes))
        if isinstance(base, FedAvgM) and base.current_arrays is not None:
            # FedAvgM starts its next step from its own last aggregate; after fusion and BatchNorm
            # recalibration the clients train from a different model, and the step must start there.
            base.current_arrays = arrays
        self._sent = arrays
        self._statistics_asked = bool(config.get(RECALIBRATE_BN, False))
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        log_ = self.round_log(server_round)
        log_.sampled_train = len(messages)
        log_.bytes_down += len(messages) * record_bytes(arrays)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        base = self.base
        if base.fraction_evaluate == 0.0:
            return []
        self.wait_for_nodes(grid, max(base.min_available_nodes, base.min_evaluate_nodes))
        config[RECALIBRATE_BN] = self.recalibrate_bn
        self._evaluated = arrays
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        log_ = self.round_log(server_round)
        log_.sampled_evaluate = len(messages)
        log_.bytes_down += len(messages) * record_bytes(arrays)
        return messages

    # --- receiving --------------------------------------------------------------------
    def screen_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Keep the sound replies; count failures and name every rejection."""
        log_ = self.round_log(server_round)
        sound = []
        for msg in replies:
            if msg.has_error():
                log_.failures += 1
                continue
            log_.replies += 1
            log_.bytes_up += sum(record_bytes(r) for r in msg.content.array_records.values())
            reason = check_reply(msg, self.spec, self.max_examples)
            if reason is None:
                sound.append(msg)
                continue
            log_.rejected += 1
            log_.rejections.append(f"node {msg.metadata.src_node_id}: {reason}")
            log(WARNING, "Rejected the update of node %s: %s", msg.metadata.src_node_id, reason)
        return sound

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        log_ = self.round_log(server_round)
        if self._statistics_asked:  # pooled into the model sent (recalibrate); the update is the rest
            replies = [without_statistics(msg) for msg in replies]
        sound = in_content_order(self.screen_replies(server_round, replies))
        log_.slowest_train_s = slowest(sound, TRAIN_SECONDS)
        log_.slowest_recalibrate_s = slowest(sound, RECALIBRATE_SECONDS)
        log_.slowest_total_s = slowest(sound, CLIENT_SECONDS)
        start = time.perf_counter()
        if self.private and self._sent is not None:  # see task.scalars_from
            sound = [map_arrays(msg, lambda record: scalars_from(record, self._sent)) for msg in sound]
        arrays, metrics = self.strategy.aggregate_train(server_round, [map_arrays(msg, as_float) for msg in sound])
        if self.private and arrays is not None and self._sent is not None:
            arrays = as_float(scalars_from(arrays, self._sent))  # the counters without the noise
        log_.aggregate_ms = 1000 * (time.perf_counter() - start)
        if arrays is None:
            log(WARNING, "Round %s: no sound update (%s failures, %s rejected); the global model is kept",
                server_round, log_.failures, log_.rejected)
            return None, metrics
        log_.aggregated = True
        log_.train_metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        if self.fusion_unit is not None:
            start = time.perf_counter()
            self.learn_and_fuse(server_round, arrays, log_)
            log_.fusion_ms = 1000 * (time.perf_counter() - start)
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["fusion-applied"] = log_.fusion_applied
        metrics["fusion-skipped"] = log_.fusion_skipped
        metrics["fusion-ms"] = log_.fusion_ms
        if log_.adapter_loss is not None:
            metrics["adapter-loss"] = log_.adapter_loss
        metrics["rejected-replies"] = log_.rejected
        return arrays, metrics

    def learn_and_fuse(self, server_round: int, arrays: ArrayRecord, log_: RoundLog) -> None:
        unit = self.fusion_unit
        assert unit is not None
        average = torch.from_numpy(values(arrays[self.target]).copy())
        if self.pending_fused is not None:
            log_.adapter_loss = unit.learn(self.pending_fused, average)
            self.pending_fused = None
            if log_.adapter_loss is None:
                log_.fusion_skipped += 1
                log(WARNING, "Round %s: adapter update skipped, its gradient is not finite", server_round)
            else:
                log_.learned = 1
        if self.fuses_in(server_round):
            fused = unit.fuse(average)
            if fused is None:
                log_.fusion_skipped += 1
                log(WARNING, "Round %s: fusion skipped, the adapter's output is not finite; the average is kept",
                    server_round)
            else:
                arrays[self.target] = as_array(fused.numpy())
                self.pending_fused = fused
                log_.fusion_applied = 1
                log_.fusion_shift = unit.last_shift
                log(INFO, "Round %s: fused %s with the teacher (gate %s)", server_round, self.target, unit.gate_value)
        log_.adapter_lr = unit.lr
        log_.gate = unit.gate_value

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        log_ = self.round_log(server_round)
        log_.evaluate_metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        log_.evaluate_metrics["replies"] = float(sum(not m.has_error() for m in replies))
        if self.recalibrate_bn and self._evaluated is not None:
            self.recalibrate(server_round, replies, self._evaluated)
        return metrics

    def recalibrate(self, server_round: int, replies: list[Message], arrays: ArrayRecord) -> int:
        """Pool the clients' recomputed BatchNorm statistics into ``arrays``, round
        ``server_round``'s global model; returns (and logs for the round) how many clients
        contributed. Replies without sound statistics are left out, with a warning."""
        sound = []
        for msg in replies:
            if msg.has_error():
                continue
            reason = check_statistics(msg, self.spec, self.max_examples)
            if reason is None:
                sound.append(msg)
            else:
                log(WARNING, "Round %s: BatchNorm statistics of node %s left out: %s",
                    server_round, msg.metadata.src_node_id, reason)
        sound = in_content_order(sound, STATISTICS)
        stats = [tensors_of(msg.content[STATISTICS]) for msg in sound]
        weights = [float(next(iter(msg.content.metric_records.values()))[TRAIN_EXAMPLES]) for msg in sound]
        if stats:
            for name, tensor in pool_bn_statistics(stats, weights).items():
                arrays[name] = as_array(tensor.numpy())
        self.round_log(server_round).bn_recalibrated = len(stats)
        return len(stats)


class FedMergeNet(MergeNetFusion):
    """Fusion over FedAvg: ``FedMergeNet(spec=..., fraction_train=...)`` takes FedAvg's own
    arguments next to the fusion's."""

    def __init__(self, *, spec: dict[str, TensorSpec], fusion_unit: KnowledgeFusionUnit | None = None,
                 fusion_start_round: int = 2, fusion_frequency: int = 1, max_examples: int = 10**8,
                 node_wait_timeout: float = 300.0, target: str = STUDENT_LAYER, recalibrate_bn: bool = False,
                 **fedavg_kwargs: Any) -> None:
        super().__init__(FedAvg(**fedavg_kwargs), spec=spec, fusion_unit=fusion_unit,
                         fusion_start_round=fusion_start_round, fusion_frequency=fusion_frequency,
                         max_examples=max_examples, node_wait_timeout=node_wait_timeout, target=target,
                         recalibrate_bn=recalibrate_bn)


def wrapped(strategy: Strategy) -> list[Strategy]:
    """The strategy and everything it wraps: Flower's DP wrappers (and ours) keep what they wrap
    in ``.strategy``; the last one aggregates."""
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), Strategy):
        chain.append(chain[-1].strategy)
    return chain


def innermost(strategy: Strategy) -> Strategy:
    return wrapped(strategy)[-1]


def privatised(strategy: Strategy) -> bool:
    """Whether a Flower DP wrapper is in the chain."""
    dp = (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyClientSideFixedClipping,
          DifferentialPrivacyServerSideAdaptiveClipping, DifferentialPrivacyClientSideAdaptiveClipping)
    return any(isinstance(s, dp) for s in wrapped(strategy))


def in_content_order(replies: list[Message], key: str | None = None) -> list[Message]:
    """The replies in an order set by what they carry (the first tensor of their ArrayRecord
    ``key``, or of their only one), not by when they arrived: sums of floats depend on their
    order, and a seeded run must give the same numbers every time it runs."""
    def content(msg: Message) -> tuple[float, int]:
        record = msg.content[key] if key in msg.content.array_records else next(iter(msg.content.array_records.values()))
        first = values(next(iter(record.values())))
        return float(first.sum(dtype=np.float64)), msg.metadata.src_node_id
    return sorted(replies, key=content)


def without_statistics(msg: Message) -> Message:
    """The train reply without the BatchNorm statistics it carried, in place."""
    if not msg.has_error():
        msg.content.pop(STATISTICS, None)
    return msg


def map_arrays(msg: Message, change: Callable[[ArrayRecord], ArrayRecord]) -> Message:
    """The reply with ``change`` applied to each of its ArrayRecords, in place."""
    for key, record in list(msg.content.array_records.items()):
        msg.content[key] = change(record)
    return msg
