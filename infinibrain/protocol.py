"""The wire protocol shared by the SDK, the manager and the Connector (docs/PROTOCOL.md).

Every message is a multipart ZeroMQ message ``[topic, header, *payload]``:

- ``topic``: who it is for (the SUB side filters on it);
- ``header``: a msgpack map with at least ``v`` (protocol version) and ``k`` (kind);
- ``payload``: raw frames (image pixels, bytes, an encoded result), never re-encoded,
  sent and received zero-copy.

Encoding and decoding live here and nowhere else. ``decode`` raises ProtocolError for
anything that is not a well-formed message of this version; callers count, log and drop.

Pure: any thread (each socket it sends on or reads from is used by one thread).
"""
from __future__ import annotations

import math
import struct
import time
from typing import Any, Iterator, Sequence

import msgpack
import numpy as np
import zmq

VERSION = 1
NOBLOCK = int(zmq.NOBLOCK)
_Frame = zmq.Frame
_SNDMORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

# Port offsets from the manager's base port. The manager binds all of them.
INFER_IN = 0  # clients' PUB -> manager SUB: inference requests
MGMT_IN = 1  # clients' PUB -> manager SUB: hello, heartbeat, management commands
CLIENT_OUT = 2  # manager PUB -> clients' SUB: acks, results, replies, heartbeats, events
CONTAINER_OUT = 3  # manager XPUB -> containers' SUB: requests, pings
CONTAINER_IN = 4  # containers' PUB -> manager SUB: hello, results
PORT_COUNT = 5

# Bytes of one frame a peer may send (the manager's max_message_size, ZMQ_MAXMSGSIZE) when
# nothing else is said: the manager's default, and what a client or container assumes
# until it is told.
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
# Bytes of a message's header (the manager's max_header_size): a request's ``param``, a
# command's arguments. Checked before the header is decoded, and by the SDK before it sends.
DEFAULT_MAX_HEADER_SIZE = 1024 * 1024
# Frames of one message: a topic, a header and the payload (one frame per request of a batch).
MAX_FRAMES = 4 + 4096
# Requests per message to a container, when neither its inference (max_batch_size) nor its
# program (Connector's max_size) says more: no batching.
DEFAULT_MAX_BATCH_SIZE = 1

# A request's priority (header "pri") is a 32-bit signed integer; absent = 0.
PRIORITY_LIMIT = 2**31


# A manager group (several managers, one leading; manager/group.py): a client or container
# connects to every manager it is told of, and only the leader binds, so ZeroMQ's own
# reconnection follows the leader. ZMTP pings on those connections drop one to a manager
# that stopped answering (a paused process keeps its sockets bound) within the timeout;
# ZMQ_IMMEDIATE keeps messages off a connection that is not up (without it, what was sent
# while a manager was gone would wait for it and reach it when it comes back as a standby).
GROUP_PING_MS = 1_000
GROUP_PING_TIMEOUT_MS = 3_000


def manager_hosts(value: str) -> list[str]:
    """The managers ``value`` names: one host, or a group's, comma-separated."""
    return [h.strip() for h in value.split(",") if h.strip()]


def connect_managers(sock: zmq.Socket, hosts: Sequence[str], port: int) -> None:
    """Connect ``sock`` to ``port`` of every manager in ``hosts`` (pinged when a group)."""
    if len(hosts) > 1:
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.HEARTBEAT_IVL, GROUP_PING_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, GROUP_PING_TIMEOUT_MS)
    for host in hosts:
        sock.connect(f"tcp://{host}:{port}")


def valid_priority(priority: Any) -> bool:
    return type(priority) is int and -PRIORITY_LIMIT <= priority < PRIORITY_LIMIT


# Message kinds (header "k").
HELLO = "hello"  # client or container -> manager: prove the path works
HELLO_ACK = "hello_ack"  # manager -> client
HEARTBEAT = "hb"  # both ways between manager and clients
REQUEST = "req"  # inference request (client -> manager -> container)
ACK = "ack"  # manager -> client: request accepted, with its deadline
RESULT = "res"  # inference result or error (container -> manager -> client)
TAKEN = "taken"  # container -> manager: request taken (inference with output=None)
REQUESTS = "reqb"  # manager -> container that asked for batches: several requests in one message
RESULTS = "resb"  # container -> manager: results of several requests in one message
COMMAND = "cmd"  # client -> manager: management command
REPLY = "reply"  # manager -> client: outcome of a management command
EVENT = "ev"  # manager -> all clients: 114 and produced results
PING = "ping"  # manager -> container: please say hello on your response path
PROGRESS = "prog"  # manager -> client: progress of a slow command (an image sent, loaded)
CALL = "call"  # container -> manager: a request to another inference (Connector.infer); its answer is a RESULT on the Connector's topic

# A container id a Connector gives itself when it runs without INFINIBRAIN_CONTAINER (started
# by hand with explicit arguments): "~" and a random token. The manager attaches it to an
# ``other`` container serving its module.
ANONYMOUS = "~"

# Topics.
TOPIC_HEARTBEAT = b"hb"
TOPIC_EVENT = b"ev"
TOPIC_MANAGER = b"m"  # everything sent to the manager's SUB sockets


def client_topic(client_id: str) -> bytes:
    return b"c/" + client_id.encode()


def reply_topic(client_id: str, tag: Any) -> bytes:
    """Where a client's answers go: its own topic, or with ``tag`` (a request's or a
    hello's "to") the topic of one of its threads' own sockets (a synchronous caller
    that receives its result itself). Not a prefix of the client's topic nor of another
    tag's, so each SUB socket gets only its own."""
    if type(tag) is str and 0 < len(tag) <= 32 and tag.isalnum():
        return b"t/" + client_id.encode() + b"/" + tag.encode() + b"/"
    return client_topic(client_id)


def topic_client(topic: bytes) -> str | None:
    """The client id a client topic belongs to (``c/<cid>``, or a thread's
    ``t/<cid>/<tag>/``); None for any other topic (a prefix of several, say)."""
    try:
        text = topic.decode()
    except UnicodeDecodeError:
        return None
    parts = text.split("/")
    if len(parts) == 2 and parts[0] == "c" and parts[1]:
        return parts[1]
    if len(parts) == 4 and parts[0] == "t" and parts[1] and parts[2].isalnum() and len(parts[2]) <= 32 and parts[3] == "":
        return parts[1]
    return None


def container_topic(container_id: str, sub_name: str) -> bytes:
    return f"q/{container_id}/{sub_name}".encode()


def is_container_topic(topic: bytes) -> bool:
    return topic[:2] == b"q/"


def parse_container_topic(topic: bytes) -> tuple[str, str] | None:
    """(container id, sub name) of a container subscription topic, or None."""
    try:
        text = topic.decode()
    except UnicodeDecodeError:
        return None
    parts = text.split("/", 2)
    if len(parts) != 3 or parts[0] != "q" or not parts[1]:
        return None
    return parts[1], parts[2]


class ProtocolError(ValueError):
    """A frame that is not a message of this protocol version."""


class Message:
    """One decoded message: its topic frame, header and payload frames."""

    __slots__ = ("_topic", "header", "payload")

    def __init__(self, topic: Any, header: dict, payload: list) -> None:
        self._topic = topic  # a frame; made bytes only if someone asks (nobody on the request path)
        self.header = header
        self.payload = payload

    @property
    def topic(self) -> bytes:
        return frame_bytes(self._topic)

    @property
    def kind(self) -> str:
        return self.header["k"]


def encode(topic: bytes, kind: str, header: dict | None = None, payload: Sequence[Any] = ()) -> list:
    """Frames of one message, ready for ``send_multipart(copy=False)``."""
    head = {"v": VERSION, "k": kind}
    if header:
        head.update(header)
    return [topic, msgpack.packb(head, use_bin_type=True), *payload]


def send(sock: Any, frames: Sequence[Any], flags: int = 0) -> None:
    """Send one message's frames (as ``send_multipart(copy=False)``, with plain int flags:
    pyzmq's flag enums cost more than the send itself on this path). ``flags``: NOBLOCK,
    for a socket that refuses a peer's message at its high-water mark (zmq.Again)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, (_SNDMORE if i < last else 0) | flags, copy=False)


def recv(sock: Any, flags: int = 0) -> list:
    """One message's frames, zero-copy (``recv_multipart(copy=False)``, the same way cheaper);
    with NOBLOCK, zmq.Again when there is none."""
    frames = [sock.recv(flags, copy=False)]
    while frames[-1].more:
        frames.append(sock.recv(0, copy=False))
    return frames


def received(sock: Any, limit: int, polled: bool = False) -> Iterator[list]:
    """The frames of each message waiting on ``sock``, at most ``limit`` messages (so one
    busy socket cannot hold its reader for ever). ``polled``: a poll has just said a
    message is there, so the first is taken without asking.

    Whether another is waiting is asked (ZMQ_EVENTS) rather than found by a NOBLOCK
    receive that fails: pyzmq's zmq.Again costs three times the question, and a loop
    that drains a socket would meet one on every pass."""
    for i in range(limit):
        if (i or not polled) and not sock.get(_EVENTS) & _POLLIN:
            return
        try:
            frames = recv(sock, NOBLOCK)
        except zmq.Again:  # not there after all: never wait for one here
            return
        yield frames


def decode(frames: Sequence[Any], max_header: int = 0) -> Message:
    """Parse frames received with ``recv_multipart(copy=False)`` or as bytes. With
    ``max_header``, a header larger than that, or more than MAX_FRAMES frames, is refused
    before anything is decoded (a large header would hold the reader for a long time)."""
    if len(frames) < 2:
        raise ProtocolError(f"expected at least 2 frames, got {len(frames)}")
    if max_header:
        if len(frames) > MAX_FRAMES:
            raise ProtocolError(f"{len(frames)} frames, more than {MAX_FRAMES}")
        size = len(frames[1])
        if size > max_header:
            raise ProtocolError(f"a header of {size} bytes, more than max_header_size ({max_header})")
    try:
        header = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)  # a frame is a buffer: no copy
    except Exception as exc:  # msgpack raises several unrelated classes
        raise ProtocolError(f"header is not msgpack: {exc}") from None
    if type(header) is not dict:
        raise ProtocolError("header is not a map")
    if header.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {header.get('v')!r}")
    if type(header.get("k")) is not str:
        raise ProtocolError("header has no kind")
    return Message(frames[0], header, list(frames[2:]))


def frame_bytes(frame: Any) -> bytes:
    """The bytes of a received frame (a copy)."""
    return frame.bytes if type(frame) is _Frame else bytes(frame)


def frame_buffer(frame: Any) -> Any:
    """The bytes of a received frame without copying them."""
    return frame.buffer if type(frame) is _Frame else frame


# ---- payloads -------------------------------------------------------------------


def array_meta(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.str, "shape": list(array.shape)}


def array_from(meta: Any, frame: Any) -> np.ndarray:
    """A read-only ndarray over a received frame (no copy)."""
    if not isinstance(meta, dict):
        raise ProtocolError("array description missing")
    try:
        dtype = _dtype(meta["dtype"])
        shape = tuple(int(n) for n in meta["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad array description: {exc}") from None
    if dtype.hasobject:
        raise ProtocolError("object arrays are not accepted")
    if any(n < 0 for n in shape):
        raise ProtocolError(f"bad array description: negative size in {shape}")
    buf = memoryview(frame_buffer(frame))
    expected = dtype.itemsize * math.prod(shape)
    if buf.nbytes != expected:
        raise ProtocolError(f"array frame has {buf.nbytes} bytes, shape {shape} {dtype} needs {expected}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


_dtypes: dict = {}


def _dtype(name: Any) -> np.dtype:
    """``np.dtype(name)``, remembered: parsing the description costs more than the lookup."""
    dtype = _dtypes.get(name) if isinstance(name, str) else None
    if dtype is None:
        dtype = np.dtype(name)
        if isinstance(name, str) and len(_dtypes) < 256:
            _dtypes[name] = dtype
    return dtype


# A numpy array in a result travels as an array (msgpack extension type ARRAY_EXT): its
# description (dtype, shape) then its bytes, inside the result's frame. The caller gets a
# read-only ndarray of the same dtype and shape over the received bytes; before, arrays
# were made nested lists (tolist), slow for a detection or segmentation map.
ARRAY_EXT = 1
_ARRAY_HEAD = struct.Struct("<I")


def _pack_array(array: np.ndarray) -> msgpack.ExtType:
    if array.dtype.hasobject:
        raise TypeError("a numpy array of Python objects cannot be sent: give it a numeric dtype")
    head = msgpack.packb([array.dtype.str, list(array.shape)])
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data  # its bytes in C order, no copy yet
    return msgpack.ExtType(ARRAY_EXT, b"".join((_ARRAY_HEAD.pack(len(head)), head, data)))  # one copy, packb the other


def _array_hook(code: int, data: bytes) -> Any:
    if code != ARRAY_EXT:
        return msgpack.ExtType(code, data)
    try:
        (size,) = _ARRAY_HEAD.unpack_from(data)
        dtype_name, shape = msgpack.unpackb(data[4:4 + size])
    except Exception as exc:
        raise ProtocolError(f"bad array in a result: {exc}") from None
    return array_from({"dtype": dtype_name, "shape": shape}, memoryview(data)[4 + size:])  # checks the description


def _result_default(value: Any) -> Any:
    # Inference code returns numpy values all the time: a numpy scalar is sent as a plain
    # number, an array as an array (ARRAY_EXT).
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return _pack_array(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(f"a result of type {type(value).__name__} cannot be encoded")


def pack_value(value: Any) -> bytes:
    """Encode a result or a management answer (JSON-like values; numpy scalars made plain,
    numpy arrays kept as arrays)."""
    return msgpack.packb(value, use_bin_type=True, default=_result_default)


def unpack_value(frame: Any) -> Any:
    try:
        return msgpack.unpackb(frame_buffer(frame), raw=False, strict_map_key=False, ext_hook=_array_hook)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"value frame is not msgpack: {exc}") from None


def now() -> float:
    """Wall-clock time stamp for InferenceResponse.time_stamp (comparable across processes)."""
    return time.time()
