"""Model tensors on the wire: one Array per dtype instead of one per tensor, names alongside.

Flower moves every Array of a message as an object of its own: over the SuperLink's HTTP API
each is a request (signed, checked and stored one by one), so the student's 373 tensors were
about 600 requests per message, and in deployment most of a round went into them. On the wire
a message's ArrayRecords travel packed: the values of each dtype in one flat Array, and each
tensor's name, shape and dtype in a ConfigRecord (``wire``). Both ends unpack by name before
anything else reads the message, so strategies, screening, DP and fusion see the tensors by
name as before. A reply that arrives unpacked (another client implementation) passes as it is.

The ServerApp's side also asks for the replies more often than Flower's ``send_and_receive``
does (``send`` below).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid

from .arrays import as_array, values
from .task import CLIENT_SECONDS

WIRE = "wire"  # the ConfigRecord with the layout of each packed ArrayRecord
ERROR = "error"  # why a reply could not be unpacked; its screening rejects it
# A reply's WIRE record also carries when the client's side received the message and sent the
# reply (its wall clock, time.time()), for the server's split of a phase's exchange.
RECEIVED_AT, SENT_AT = "received-at", "sent-at"
POLL_FIRST_S, POLL_MAX_S = 0.05, 0.1  # how often the ServerApp asks the SuperLink for replies


def pack(record: ArrayRecord) -> tuple[ArrayRecord, dict[str, list[str]]]:
    """``record`` as one flat Array per dtype, and the layout that restores it."""
    groups: dict[str, list[np.ndarray]] = {}
    layout: dict[str, list[str]] = {"names": [], "shapes": [], "dtypes": []}
    for name, array in record.items():
        tensor = values(array)
        layout["names"].append(name)
        layout["shapes"].append(",".join(map(str, tensor.shape)))
        layout["dtypes"].append(tensor.dtype.str)
        groups.setdefault(tensor.dtype.str, []).append(tensor.reshape(-1))
    return ArrayRecord({dtype: as_array(np.concatenate(parts)) for dtype, parts in groups.items()}), layout


def unpack(packed: ArrayRecord, layout: dict[str, list[str]]) -> ArrayRecord:
    """The tensors of ``packed`` by name; ValueError when the layout does not fit its values."""
    names, shapes, dtypes = (list(layout.get(key, [])) for key in ("names", "shapes", "dtypes"))
    if not len(names) == len(shapes) == len(dtypes) or len(set(names)) != len(names):
        raise ValueError("its layout lists names, shapes and dtypes that do not pair up")
    if set(packed) != set(dtypes):
        raise ValueError(f"its packed dtypes {sorted(packed)} are not its layout's {sorted(set(dtypes))}")
    flat = {dtype: values(array) for dtype, array in packed.items()}
    offsets = dict.fromkeys(flat, 0)
    tensors = {}
    for name, shape_text, dtype in zip(names, shapes, dtypes):
        shape = tuple(int(size) for size in shape_text.split(",") if size)
        size, start = int(np.prod(shape, dtype=np.int64)), offsets[dtype]
        if size < 0 or start + size > flat[dtype].size:
            raise ValueError(f"its layout asks for more {dtype} values than it sent")
        tensors[name] = as_array(flat[dtype][start:start + size].reshape(shape))
        offsets[dtype] = start + size
    if any(offsets[dtype] != part.size for dtype, part in flat.items()):
        raise ValueError("it sent more values than its layout places")
    return ArrayRecord(tensors)


def packed(msg: Message, done: dict[int, tuple[ArrayRecord, dict[str, list[str]]]] | None = None) -> Message:
    """``msg`` with each of its ArrayRecords packed. Its content is replaced, not changed:
    Flower's strategies give all of a round's messages one shared RecordDict. ``done`` keeps
    each record packed once for all the messages that share it (by identity)."""
    done = {} if done is None else done
    content, layouts = RecordDict(), {}
    for key, record in msg.content.items():
        if isinstance(record, ArrayRecord) and record:
            if id(record) not in done:
                done[id(record)] = pack(record)
            record, layout = done[id(record)]
            layouts |= {f"{key}.{part}": entries for part, entries in layout.items()}
        content[key] = record
    if layouts:
        content[WIRE] = ConfigRecord(layouts)
    msg.content = content
    return msg


def unpacked(msg: Message) -> Message:
    """``msg`` with its ArrayRecords by name again. A layout that does not fit leaves them
    packed and says why in ``wire.error``."""
    if msg.has_error() or WIRE not in msg.content.config_records:
        return msg
    wire = msg.content[WIRE]
    content = RecordDict()
    try:
        for key, record in msg.content.items():
            if isinstance(record, ArrayRecord) and f"{key}.names" in wire:
                record = unpack(record, {part: list(wire.get(f"{key}.{part}", [])) for part in ("names", "shapes", "dtypes")})
            if key != WIRE:
                content[key] = record
    except (ValueError, KeyError, TypeError) as exc:
        msg.content[WIRE] = ConfigRecord({ERROR: f"its packed tensors cannot be unpacked: {exc}"})
        return msg
    msg.content = content
    return msg


def wire_error(msg: Message) -> str | None:
    """Why a reply could not be unpacked, or None."""
    if WIRE in msg.content.config_records and ERROR in msg.content[WIRE]:
        return str(msg.content[WIRE][ERROR])
    return None


def send(grid: Grid, messages: Iterable[Message]) -> Sent:
    """Flower's ``grid.send_and_receive`` in two halves, with the tensors packed on the way out
    and back: ``messages`` packed and pushed now, their replies from ``Sent.replies``, so that the
    server can work while the clients do."""
    at, wall = time.monotonic(), time.time()
    done: dict[int, tuple[ArrayRecord, dict[str, list[str]]]] = {}  # the global model, packed once
    ids = grid.push_messages([packed(msg, done) for msg in messages])
    return Sent(grid, set(ids), at, wall)


@dataclass(frozen=True)
class ExchangeParts:
    """Where a phase's exchange went, along the reply that came in last (the one the server
    waited for): from the server packing its messages to that client's side receiving its
    message (``dispatch_s``: the SuperLink's or the simulation engine's queue, the transfer and,
    in deployment, the ClientApp process starting), that client's side from receiving to sending
    (``client_s``: unpacking, the ClientApp's function ``function_s`` and packing), from sending
    to the server's pull of the reply (``return_s``: the transfer, the interval between pulls,
    or the server still evaluating the round before), and the server unpacking every reply
    (``unpack_s``). The first three compare the client's clock with the server's: exact on one
    machine (simulation), off by the two clocks' offset across machines (their sum is not)."""

    dispatch_s: float
    client_s: float
    function_s: float | None
    return_s: float
    unpack_s: float


@dataclass
class Sent:
    grid: Grid
    waiting: set[str]
    at: float  # time.monotonic() when the messages were packed and pushed
    wall: float  # the same moment as time.time(), to compare with the clients' clocks
    parts: ExchangeParts | None = None  # once replies() has them all

    def replies(self, timeout: float) -> list[Message]:
        """The replies, unpacked, until all are in or ``timeout`` seconds after sending; asked
        for every 50 ms at first, backing off to ``POLL_MAX_S``. (Flower's own asks every 3 s,
        which puts a floor of 3 s under every train and evaluate phase however quickly the
        clients answer: most of a round when clients train for a second or two.)"""
        deadline = self.at + timeout
        replies: list[Message] = []
        pulled_at: list[float] = []  # time.time() of each reply's pull
        interval = POLL_FIRST_S
        while self.waiting:
            arrived = list(self.grid.pull_messages(list(self.waiting)))
            replies += arrived
            pulled_at += [time.time()] * len(arrived)
            self.waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            remaining = deadline - time.monotonic()
            if not self.waiting or remaining <= 0:
                break
            time.sleep(min(interval, remaining))  # one more pull follows, at the deadline at the latest
            interval = min(2 * interval, POLL_MAX_S)
        stamped = [(times, index) for index, reply in enumerate(replies) if (times := stamps(reply)) is not None]
        replies = [unpacked(reply) for reply in replies]
        if stamped:  # along the reply pulled last (of those pulled together, sent last): the one waited for
            (received, sent), index = max(stamped, key=lambda entry: (pulled_at[entry[1]], entry[0][1]))
            self.parts = ExchangeParts(dispatch_s=received - self.wall, client_s=sent - received,
                                       function_s=function_seconds(replies[index]),
                                       return_s=pulled_at[index] - sent, unpack_s=time.time() - pulled_at[index])
        return replies


def stamps(reply: Message) -> tuple[float, float] | None:
    """When the reply's client side received its message and sent the reply, if it says so."""
    if reply.has_error() or WIRE not in reply.content.config_records:
        return None
    wire = reply.content[WIRE]
    times = wire.get(RECEIVED_AT), wire.get(SENT_AT)
    if not all(isinstance(t, float) and math.isfinite(t) for t in times):
        return None  # another client implementation, or nonsense: no split, nothing else lost
    return times


def function_seconds(reply: Message) -> float | None:
    """The ClientApp's own seconds for the reply, as our train function reports them."""
    if reply.has_error() or len(reply.content.metric_records) != 1:
        return None
    value = next(iter(reply.content.metric_records.values())).get(CLIENT_SECONDS)
    return float(value) if isinstance(value, (int, float)) else None


def wire_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The ClientApp's side: unpack what the server sent, pack the reply, and say when this
    side received the one and sent the other."""
    received = time.time()
    unpacked(msg)
    if (reason := wire_error(msg)) is not None:
        raise ValueError(f"the server's message {reason}")
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    reply = packed(reply)
    wire = reply.content[WIRE] if WIRE in reply.content.config_records else ConfigRecord()
    wire[RECEIVED_AT], wire[SENT_AT] = received, time.time()
    reply.content[WIRE] = wire
    return reply
