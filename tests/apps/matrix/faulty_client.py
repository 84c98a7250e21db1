"""Our ClientApp, acting out the fault the test ServerApp names in each message's config
(``test-fault``): ``malformed`` (nodes 1-4 corrupt their replies in every way the server must
reject), ``huge`` (node 0 sends its update scaled up 1000 times: finite and well-formed, the
kind only a robust aggregator keeps out), ``slow`` (every node answers after the phase timed
out), or none (honest)."""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmergenet.flower import client_app as honest
from fedmergenet.flower.wire import wire_mod

app = ClientApp()

# Node 0 stays honest so every round has one sound update; nodes 1-4 cycle through these,
# all eight in two rounds.
MALFORMED = ["nan", "inf", "missing", "extra", "shape", "dtype", "zero-examples", "huge-examples"]
SCALE = 1000.0
SLOW_S = 5.0


def corrupt(state: dict[str, torch.Tensor], examples: int, fault: str) -> tuple[dict[str, torch.Tensor], int]:
    name = "stage6.2.residual.6.weight"
    if fault == "nan":
        state[name] = state[name].clone().fill_(float("nan"))
    elif fault == "inf":
        state["linear.bias"] = state["linear.bias"].clone().fill_(float("inf"))
    elif fault == "missing":
        del state["linear.bias"]
    elif fault == "extra":
        state["backdoor.weight"] = torch.zeros(3)
    elif fault == "shape":
        state[name] = torch.zeros(8, 8)
    elif fault == "dtype":
        state[name] = state[name].double()
    elif fault == "zero-examples":
        examples = 0
    elif fault == "huge-examples":
        examples = 10**12
    return state, examples


def malformed(msg: Message, reply: Message, partition: int) -> Message:
    server_round = int(msg.content["config"]["server-round"])
    fault = MALFORMED[((server_round - 1) * 4 + partition - 1) % len(MALFORMED)]
    state = reply.content["arrays"].to_torch_state_dict()
    examples = int(reply.content["metrics"]["num-examples"])
    state, examples = corrupt(state, examples, fault)
    metrics = MetricRecord({"train-loss": float(np.float32(1.0)), "num-examples": examples,
                            "train-seconds": 0.0})
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


def scaled(msg: Message, reply: Message) -> Message:
    sent = msg.content["arrays"].to_torch_state_dict()
    state = reply.content["arrays"].to_torch_state_dict()
    reply.content["arrays"] = ArrayRecord({
        name: (sent[name] + SCALE * (tensor - sent[name])).to(tensor.dtype) if tensor.is_floating_point() else tensor
        for name, tensor in state.items()})
    return reply


@app.train(mods=[wire_mod, honest.client_dp])
def train(msg: Message, context: Context) -> Message:
    fault = str(msg.content["config"].get("test-fault", ""))
    partition = int(context.node_config["partition-id"])
    if fault == "slow":
        time.sleep(SLOW_S)
    reply = honest.train(msg, context)
    if fault == "malformed" and 1 <= partition <= 4:
        return malformed(msg, reply, partition)
    if fault == "huge" and partition == 0:
        return scaled(msg, reply)
    return reply


@app.evaluate(mods=[wire_mod])
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
