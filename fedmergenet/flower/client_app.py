"""The ClientApp: local training and local evaluation of the student on one partition.

Run options come from ``context.run_config``; the partition (and optionally the device)
from ``context.node_config``, which the simulation engine and our client script fill.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from ..config import RunConfig
from ..training import evaluate as evaluate_model
from ..training import (Proximal, bn_statistics, make_optimizer, make_scheduler, moved, pick_device,
                        recalibrate_bn, step_compiler, train_epoch)
from ..data.splits import ClientData, client_data
from ..models import new_student
from .task import (CLIENT_SECONDS, LOCAL_EVAL, RECALIBRATE_BN, RECALIBRATE_SECONDS, STATISTICS, TRAIN_EXAMPLES,
                   TRAIN_SECONDS, as_float, global_epoch, load_arrays, run_config, scalars_from, with_dtypes)
from .wire import wire_mod

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[RunConfig, int, int, torch.device]:
    cfg = run_config(context)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    device = pick_device(str(context.node_config.get("device", cfg.device)))
    # The node's own setting wins: only the person starting a client knows what else shares
    # its cores. Clients sharing few cores must not each spin up every core's worth of threads.
    threads = int(context.node_config.get("threads", 0)) or cfg.client_threads
    if threads > 0:
        torch.set_num_threads(threads)
    return cfg, partition_id, num_partitions, device


def local_train(cfg: RunConfig, model: torch.nn.Module, partition_id: int, num_partitions: int,
                server_round: int, device: torch.device,
                memory_format: torch.memory_format | None = None, proximal_mu: float = 0.0,
                capture: bool | None = None) -> tuple[float, int]:
    """``local_epochs`` epochs continuing the central LR schedule at this round's global epoch;
    with ``proximal_mu`` > 0 (FedProx) pulled toward the global model the round started from.
    ``memory_format`` and ``capture`` override train_epoch's fast path (the benchmarks' references)."""
    data = client_data(cfg, partition_id, num_partitions, round_seed=server_round, device=device)
    optimizer = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.milestones(), cfg.lr_gamma, start_epoch=global_epoch(cfg, server_round))
    proximal = Proximal.at(model, proximal_mu) if proximal_mu > 0 else None
    loss = float("nan")
    for epoch in range(cfg.local_epochs):
        desc = f"client {partition_id} round {server_round} epoch {epoch + 1}/{cfg.local_epochs}"
        loss = train_epoch(model, data.train, optimizer, device, desc=desc, memory_format=memory_format,
                           proximal=proximal, capture=capture, compile_backend=step_compiler(cfg.compile, device))
        scheduler.step()
    return loss, data.num_train


def client_dp(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``--dp client-fixed``: when the server's DP wrapper sends a clipping norm, Flower's
    fixedclipping_mod clips the update before it leaves. Integer buffers pass the clipping as
    float64 and leave in their own dtype again; 0-d counters leave as they came (scalars_from)."""
    if KEY_CLIPPING_NORM not in msg.content["config"]:
        return call_next(msg, context)
    dtypes: dict = {}
    statistics: dict[str, ArrayRecord] = {}

    def train_as_float(msg: Message, context: Context) -> Message:
        reply = call_next(msg, context)
        if not reply.has_error():
            # Flower's mod clips a reply of one ArrayRecord: the BatchNorm statistics of the model
            # received (STATISTICS) are not part of the update and wait outside.
            if STATISTICS in reply.content.array_records:
                statistics[STATISTICS] = reply.content.pop(STATISTICS)
            dtypes.update({name: np.dtype(array.dtype) for name, array in reply.content["arrays"].items()})
            reply.content["arrays"] = as_float(scalars_from(reply.content["arrays"], msg.content["arrays"]))
        return reply

    reply = fixedclipping_mod(msg, context, train_as_float)
    if not reply.has_error():
        reply.content["arrays"] = with_dtypes(reply.content["arrays"], dtypes)
        reply.content.update(statistics)
    return reply


@app.train(mods=[wire_mod, client_dp])
def train(msg: Message, context: Context) -> Message:
    entered = time.perf_counter()
    cfg, partition_id, num_partitions, device = _setup(msg, context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    model = new_student(cfg, device)
    load_arrays(model, msg.content["arrays"])
    content = RecordDict()
    start = time.perf_counter()
    if bool(config.get(RECALIBRATE_BN, False)):
        # The server evaluates the model it sent once these statistics arrive: one message (and,
        # in deployment, one ClientApp process) a round instead of a train and an evaluate phase.
        # Training in train mode never reads running statistics, so the update is unchanged.
        content[STATISTICS] = ArrayRecord(recomputed_statistics(cfg, model, partition_id, num_partitions, device))
    recalibrate_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # FedProx sends its mu with every train message, as Flower's FedProx documents.
    loss, num_train = local_train(cfg, model, partition_id, num_partitions, server_round, device,
                                  proximal_mu=float(config.get("proximal-mu", 0.0)))
    train_seconds = time.perf_counter() - start
    content["arrays"] = ArrayRecord(moved(model.state_dict(), "cpu"))
    metrics = MetricRecord({
        "train-loss": loss,
        "num-examples": num_train,
        TRAIN_SECONDS: train_seconds,
        RECALIBRATE_SECONDS: recalibrate_seconds,
        # All of this function, model set-up and the copy back included: what a round spends
        # beyond it is the server's and the messages'.
        CLIENT_SECONDS: time.perf_counter() - entered,
    })
    if STATISTICS in content:
        metrics[TRAIN_EXAMPLES] = num_train  # the statistics' weight when the server pools them
    content["metrics"] = metrics
    return Message(content=content, reply_to=msg)


def recomputed_statistics(cfg: RunConfig, model: torch.nn.Module, partition_id: int, num_partitions: int,
                          device: torch.device, data: ClientData | None = None) -> dict[str, torch.Tensor]:
    """``model``'s BatchNorm statistics recomputed on the local training split (its first
    ``recalibrate_batches`` batches when set), always over the same batches (round seed 0)
    whichever phase asks; the model keeps them."""
    data = data or client_data(cfg, partition_id, num_partitions, device=device)
    recalibrate_bn(model, data.train, device, max_batches=cfg.recalibrate_batches)
    return bn_statistics(model)


@app.evaluate(mods=[wire_mod])
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the local validation split (unless the server says
    ``local-eval`` false); when the server asks, first recompute its BatchNorm statistics on the
    local training split and send them back."""
    cfg, partition_id, num_partitions, device = _setup(msg, context)
    model = new_student(cfg, device)
    load_arrays(model, msg.content["arrays"])
    data = client_data(cfg, partition_id, num_partitions, device=device)
    config = msg.content["config"]
    content = RecordDict()
    if bool(config.get(RECALIBRATE_BN, False)):
        content[STATISTICS] = ArrayRecord(recomputed_statistics(cfg, model, partition_id, num_partitions, device, data))
    metrics = MetricRecord({"num-examples": max(data.num_val, 1), TRAIN_EXAMPLES: data.num_train})
    if bool(config.get(LOCAL_EVAL, True)):  # off when only the server's evaluation is read
        result = evaluate_model(model, data.val, device)
        metrics.update({"eval-loss": result.loss, "eval-top1": result.top1, "eval-top5": result.top5,
                        "num-examples": max(result.examples, 1)})
    content["metrics"] = metrics
    return Message(content=content, reply_to=msg)
