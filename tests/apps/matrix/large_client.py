"""A ClientApp whose node 0 trains honestly, then sends its update scaled up 1000 times:
large but finite and well-formed in every way the server screens, the kind of update only
a robust aggregator can keep out of the global model. The other nodes are honest."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedmergenet.flower import client_app as honest

app = ClientApp()
SCALE = 1000.0


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest.train(msg, context)
    if int(context.node_config["partition-id"]) != 0:
        return reply
    sent = msg.content["arrays"].to_torch_state_dict()
    state = reply.content["arrays"].to_torch_state_dict()
    reply.content["arrays"] = ArrayRecord({
        name: (sent[name] + SCALE * (tensor - sent[name])).to(tensor.dtype) if tensor.is_floating_point() else tensor
        for name, tensor in state.items()})
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
