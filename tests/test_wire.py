"""The student on the wire: packed one Array per dtype, unpacked by name at both ends."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedmergenet.config import RunConfig
from fedmergenet.results import EXCHANGE_FIELDS
from fedmergenet.flower.aggregation import build_strategy
from fedmergenet.flower.client_app import client_dp
from fedmergenet.flower.server_app import sampling
from fedmergenet.flower.strategy import MergeNetFusion, spec_of
from fedmergenet.flower import wire
from fedmergenet.flower.wire import WIRE, packed, unpacked, wire_error, wire_mod


pytestmark = pytest.mark.usefixtures("task_identity")


def trained(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: t + 0.01 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t + seed
            for name, t in state.items()}


def reply(state: dict[str, torch.Tensor], node_id: int, examples: int = 10) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node_id,
                          message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": examples})}),
                   reply_to=instruction)


def by_name(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def test_a_message_travels_as_one_array_per_dtype_and_arrives_by_name(base_state):
    """Flower moves each Array as an object of its own; packed, the student is a handful."""
    sent = reply(trained(base_state, 1), node_id=101)
    before = by_name(sent.content["arrays"])
    objects_unpacked = len(get_all_nested_objects(sent))

    wire = packed(sent)
    assert set(wire.content["arrays"]) == {"<f4", "<i8"}  # float32 weights and buffers, int64 counters
    assert len(get_all_nested_objects(wire)) <= 12 < 200 < objects_unpacked

    arrived = by_name(unpacked(wire).content["arrays"])
    assert list(arrived) == list(before)  # every name, in order
    for name, values in before.items():
        assert arrived[name].dtype == values.dtype and arrived[name].shape == values.shape, name
        assert np.array_equal(arrived[name], values), name
    assert WIRE not in wire.content.config_records  # nothing of the packing is left for the strategy


def test_a_reply_whose_layout_does_not_fit_is_rejected_and_the_rest_averaged(base_state):
    cfg = RunConfig(num_clients=2, fusion=False)
    strategy = MergeNetFusion(build_strategy(cfg, sampling(cfg)), spec=spec_of(base_state))
    honest, liar = packed(reply(trained(base_state, 1), 101)), packed(reply(trained(base_state, 2), 102))
    layout = dict(liar.content[WIRE])
    layout["arrays.names"] = layout["arrays.names"][:-1]  # one tensor fewer than its values
    liar.content[WIRE] = ConfigRecord(layout)

    replies = [unpacked(honest), unpacked(liar)]
    assert wire_error(replies[0]) is None and "cannot be unpacked" in wire_error(replies[1])
    arrays, _ = strategy.aggregate_train(1, replies)
    log_ = strategy.round_log(1)
    assert (log_.replies, log_.rejected) == (2, 1)
    assert "node 102: its packed tensors cannot be unpacked" in log_.rejections[0]
    assert np.array_equal(arrays["linear.bias"].numpy(), honest.content["arrays"]["linear.bias"].numpy())


def test_a_reply_sent_unpacked_passes_as_it_is(base_state):
    """Another client implementation may send plain ArrayRecords: they are screened as ever."""
    plain = reply(trained(base_state, 1), 101)
    record = plain.content["arrays"]
    assert unpacked(plain).content["arrays"] is record and wire_error(plain) is None


def test_the_clientapp_side_unpacks_what_it_gets_and_packs_its_reply_around_client_dp(base_state):
    """wire_mod is the outer mod: client-side DP clips the update by name, then it is packed."""
    msg = Message(RecordDict({"arrays": ArrayRecord(base_state),
                              "config": ConfigRecord({"server-round": 1, KEY_CLIPPING_NORM: 0.5})}),
                  dst_node_id=101, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=101, node_config={}, state=RecordDict(), run_config={})
    seen: list[list[str]] = []

    def train(m: Message, c: Context) -> Message:
        seen.append(list(m.content["arrays"]))
        return reply(trained(base_state, 1), 101)

    out = wire_mod(packed(msg), context, lambda m, c: client_dp(m, c, train))
    assert seen == [list(base_state)]  # training got the tensors by name
    assert set(out.content["arrays"]) == {"<f4", "<i8"}  # and its reply leaves packed
    clipped = unpacked(out).content["arrays"].to_torch_state_dict()
    moved = torch.sqrt(sum(((clipped[k].double() - base_state[k].double()) ** 2).sum() for k in base_state))
    assert 0.4 < moved <= 0.5 + 1e-6


def test_messages_sharing_one_content_are_each_packed_once(base_state):
    """Flower's strategies send a round's messages with one shared RecordDict: packing one
    message must not pack the others' tensors a second time."""
    content = RecordDict({"arrays": ArrayRecord(base_state), "config": ConfigRecord({"server-round": 1})})
    messages = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in (101, 102)]
    done: dict = {}
    sent = [packed(m, done) for m in messages]
    assert sent[0].content["arrays"] is sent[1].content["arrays"] and len(done) == 1  # packed once, shared
    for msg in sent:
        assert list(unpacked(msg).content["arrays"]) == list(base_state)
    assert list(content["arrays"]) == list(base_state)  # the strategy's own content is untouched


class SlowGrid:
    """A Grid whose node ``n`` replies ``n`` seconds after the push, on a fake clock."""

    def __init__(self, clock: list[float]) -> None:
        self.clock, self.pulls = clock, 0
        self.sent: dict[str, tuple[Message, float]] = {}

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = f"m{len(self.sent)}"
            message.metadata.__dict__["_message_id"] = message_id  # as the SuperLink assigns it
            self.sent[message_id] = (message, self.clock[0] + message.metadata.dst_node_id)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        for message_id in message_ids:
            message, ready = self.sent[message_id]
            if ready <= self.clock[0]:
                answer = unpacked(message).content["arrays"]
                yield packed(Message(RecordDict({"arrays": answer, "metrics": MetricRecord({"num-examples": 1})}),
                                     reply_to=message))


def test_replies_are_collected_soon_after_they_arrive_and_the_phase_ends_at_its_timeout(base_state, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(wire.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(wire.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    grid = SlowGrid(clock)
    content = RecordDict({"arrays": ArrayRecord(base_state), "config": ConfigRecord({"server-round": 1})})

    replies = wire.send(grid, [Message(content, dst_node_id=n, message_type=MessageType.TRAIN)
                               for n in (1, 2)]).replies(timeout=60.0)
    assert len(replies) == 2
    assert list(replies[0].content["arrays"]) == list(base_state)  # unpacked by name
    assert 2.0 <= clock[0] <= 2.0 + wire.POLL_MAX_S  # not Flower's 3 s steps
    assert grid.pulls <= 2.0 / wire.POLL_MAX_S + 2  # at most one pull every POLL_MAX_S, not a busy loop

    clock[0], grid.pulls = 0.0, 0
    replies = wire.send(grid, [Message(content, dst_node_id=n, message_type=MessageType.TRAIN)
                               for n in (1, 30)]).replies(timeout=10.0)
    assert len(replies) == 1 and clock[0] == 10.0  # the late node's reply is left out, pulled last at the deadline


def test_the_clientapp_side_says_when_it_received_the_message_and_sent_the_reply(base_state):
    msg = packed(Message(RecordDict({"arrays": ArrayRecord(base_state), "config": ConfigRecord({"server-round": 1})}),
                         dst_node_id=101, message_type=MessageType.TRAIN))
    context = Context(run_id=1, node_id=101, node_config={}, state=RecordDict(), run_config={})
    called: list[float] = []

    def train(m: Message, c: Context) -> Message:
        called.append(time.time())
        return reply(trained(base_state, 1), 101)

    before = time.time()
    out = wire_mod(msg, context, train)
    received, sent = wire.stamps(out)
    assert before <= received <= called[0] <= sent <= time.time()
    assert WIRE not in unpacked(out).content.config_records  # the strategy sees none of it


class StampedGrid:
    """A Grid whose node ``n`` replies at ``n`` seconds on a fake clock, with the client-side
    times ``stamps[n]`` (received, sent: seconds after the push, or what a client sent instead)
    and its function's seconds."""

    def __init__(self, clock: list[float], stamps: dict[int, tuple[float, float, float]], wall0: float) -> None:
        self.clock, self.stamps, self.wall0 = clock, stamps, wall0
        self.sent: dict[str, Message] = {}

    def push_messages(self, messages):
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{message.metadata.dst_node_id}"
            self.sent[message.metadata.message_id] = message
        return list(self.sent)

    def pull_messages(self, message_ids):
        for message_id in message_ids:
            message = self.sent[message_id]
            node = message.metadata.dst_node_id
            if node <= self.clock[0]:
                received, sent, function = self.stamps[node]
                metrics = MetricRecord({"num-examples": 1, "client-seconds": function})
                answer = packed(Message(RecordDict({"arrays": unpacked(message).content["arrays"], "metrics": metrics}),
                                        reply_to=message))
                for key, at in ((wire.RECEIVED_AT, received), (wire.SENT_AT, sent)):
                    answer.content[WIRE][key] = self.wall0 + at if isinstance(at, float) else at
                yield answer


def test_a_phases_exchange_splits_along_the_reply_it_waited_for(base_state, monkeypatch):
    """Out to the client, the client's side (its function within), back, and the server's
    unpacking: along the reply pulled last, adding up to the whole exchange."""
    clock, wall0 = [0.0], 1_000.0
    monkeypatch.setattr(wire.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(wire.time, "time", lambda: wall0 + clock[0])
    monkeypatch.setattr(wire.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    content = RecordDict({"arrays": ArrayRecord(base_state), "config": ConfigRecord({"server-round": 1})})
    grid = StampedGrid(clock, {1: (0.1, 0.9, 0.7), 3: (0.2, 2.9, 2.5)}, wall0)

    sent = wire.send(grid, [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 3)])
    assert len(sent.replies(timeout=60.0)) == 2
    parts = sent.parts
    assert (parts.dispatch_s, parts.client_s, parts.function_s) == pytest.approx((0.2, 2.7, 2.5))  # node 3's
    assert 0.1 <= parts.return_s <= 0.1 + wire.POLL_MAX_S  # sent at 2.9, pulled at the first pull from 3.0
    assert parts.unpack_s == 0.0  # the fake clock stands still while the server unpacks
    assert parts.dispatch_s + parts.client_s + parts.return_s + parts.unpack_s == pytest.approx(clock[0])
    assert set(EXCHANGE_FIELDS) == {field.name for field in dataclasses.fields(parts)}  # each has its row column

    clock[0] = 0.0  # a client that stamps nonsense: no split, and its reply counts as ever
    sent = wire.send(StampedGrid(clock, {1: (0.1, "soon", 0.7)}, wall0),
                     [Message(content, dst_node_id=1, message_type=MessageType.TRAIN)])
    assert list(sent.replies(timeout=60.0)[0].content["arrays"]) == list(base_state) and sent.parts is None


def test_arrays_are_written_as_np_save_writes_them_and_read_without_parsing(base_state):
    """as_array writes the bytes Flower's Array(ndarray) writes (np.save's), for every tensor of
    the student; values reads them back as a read-only view, and tensors_of as writable copies,
    both equal to what Flower's own numpy() and to_torch_state_dict() give."""
    from flwr.app import Array

    from fedmergenet.flower.arrays import as_array, tensors_of, values

    state = trained(base_state, 1)
    flowers = ArrayRecord(state)
    for name, tensor in state.items():
        assert as_array(tensor.numpy()) == flowers[name], name  # dtype, shape, stype and bytes
        view = values(flowers[name])
        assert not view.flags.writeable and view.dtype == tensor.numpy().dtype
        assert np.array_equal(view, flowers[name].numpy()), name
    ours = tensors_of(flowers)
    assert list(ours) == list(state)
    for name, tensor in flowers.to_torch_state_dict().items():
        assert torch.equal(ours[name], tensor) and ours[name].numpy().flags.writeable, name
    odd = [np.array(2.5), np.arange(6, dtype=np.float32).reshape(2, 3).T, np.zeros((0, 4)),
           np.array([True, False])]
    for array in odd:  # a 0-d counter, a Fortran-ordered view, an empty and a boolean array
        assert np.array_equal(values(as_array(array)), array) and np.array_equal(as_array(array).numpy(), array)
        assert np.array_equal(values(Array(array)), array)


def test_an_array_whose_bytes_do_not_match_its_dtype_and_shape_is_read_by_flowers_parse():
    """values takes the shortcut only where the header is exactly the one for the Array's own dtype
    and shape: otherwise it returns what Flower's numpy() reads, whatever that is."""
    from flwr.app import Array

    from fedmergenet.flower.arrays import values

    data = Array(np.arange(3, dtype=np.float32)).data
    for dtype, shape in (("float32", (2,)), ("int32", (3,)), ("float32", (3, 1))):
        claimed = Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)
        assert values(claimed).shape == (3,) and values(claimed).dtype == np.float32
        assert np.array_equal(values(claimed), claimed.numpy())
    cut = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=data[:-4])
    with pytest.raises(ValueError):
        values(cut)  # np.load's own error for a truncated array, as numpy() raises it
