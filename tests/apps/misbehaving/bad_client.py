"""A ClientApp that trains honestly, then corrupts its reply in a way chosen by its node
and the round: every kind of malformed update the server must reject."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmergenet.flower import client_app as honest

app = ClientApp()

# Node 0 stays honest so every round has one sound update; the others cycle through these.
FAULTS = ["nan", "inf", "missing", "extra", "shape", "dtype", "zero-examples", "huge-examples"]


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest.train(msg, context)
    partition = int(context.node_config["partition-id"])
    if partition == 0:
        return reply
    server_round = int(msg.content["config"]["server-round"])
    fault = FAULTS[((server_round - 1) * 3 + partition - 1) % len(FAULTS)]
    state = reply.content["arrays"].to_torch_state_dict()
    examples = int(reply.content["metrics"]["num-examples"])
    state, examples = corrupt(state, examples, fault)
    metrics = MetricRecord({"train-loss": float(np.float32(1.0)), "num-examples": examples,
                            "train-seconds": 0.0})
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
