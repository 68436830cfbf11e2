"""Connector: what an inference program inside a container uses (reference chapter 5).

Inside a deployed container ``Connector()`` needs no arguments: the manager puts the
connection details in the environment (``INFINIBRAIN_HOST``, ``INFINIBRAIN_PUB_PORT``,
``INFINIBRAIN_SUB_PORT``, ``INFINIBRAIN_CONTAINER``, ``INFINIBRAIN_SUB_NAME``). Explicit
arguments override them. ``sub_name`` selects the module of the container whose requests
this Connector receives; several Connectors (one per module, each in its own thread) may
share one container.

An image arrives as a read-only numpy array over the received message (no copy), or over
a copy of it when the client sent it through shared memory (infinibrain/shm.py); call
``.copy()`` before changing it in place.

Liveness: while a Connector waits in ``receive_request(_image)`` it tells the manager it
is idle and alive every ``INFINIBRAIN_HEARTBEAT_MS`` (default 2500, the manager's own
``container_heartbeat_ms`` default) if it has sent nothing else meanwhile. A module stuck
in its own code sends nothing; the manager then stops sending it requests
(docs/OPERATIONS.md, "Container lifecycle").

Calls (not in the reference): ``infer``/``infer_image`` ask another inference through
the manager and wait for its answer here, keeping this module's requests that arrive
meanwhile for the next receive (calls.py; manager/calls.py).

Owned by the program's thread that made it (one Connector per thread).
"""
from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections import deque
from typing import Any

import numpy as np
import zmq

from .. import allocator
from .. import protocol as P
from .. import security
from .. import shm
from ..errors import (RECEIVE_TIMEOUT_MESSAGE, ContainerReceiveTimeoutException, InfinibrainException, argument_error,
                      format_message, make_error)
from ..types import InferenceResponse
from .._api import check_size
from .calls import DEFAULT_CALL_TIMEOUT, call_message, call_outcome

log = logging.getLogger("infinibrain.containers")


class Connector:
    """Receives inference requests for one module and sends its results back."""

    def __init__(self, context: zmq.Context | None = None, sub_name: str | None = None, host_ip: str | None = None,
                 pub_port: str | int | None = None, sub_port: str | int | None = None) -> None:
        env = os.environ
        if context is not None and not isinstance(context, zmq.Context):
            raise argument_error("context", "must be a zmq.Context")
        sub_name = sub_name if sub_name is not None else env.get("INFINIBRAIN_SUB_NAME")
        host_ip = host_ip or env.get("INFINIBRAIN_HOST")
        self.container_id = env.get("INFINIBRAIN_CONTAINER", "")
        # Who this is on the wire: the instance the manager started (a rolling update runs
        # two of one container for a while), else the container named in the environment,
        # else (a program started by hand with explicit arguments) a name of its own, which
        # the manager gives to an ``other`` container serving ``sub_name``.
        self._wire_id = env.get("INFINIBRAIN_INSTANCE") or self.container_id or P.ANONYMOUS + uuid.uuid4().hex[:12]
        if not isinstance(sub_name, str) or not sub_name or "/" in sub_name:
            raise argument_error("sub_name", "" if not sub_name else "must be a name without '/'")
        if not isinstance(host_ip, str) or not host_ip:
            raise argument_error("host_ip")
        pub = _port(pub_port or env.get("INFINIBRAIN_PUB_PORT"), "pub_port")
        sub = _port(sub_port or env.get("INFINIBRAIN_SUB_PORT"), "sub_port")
        if "/" in self._wire_id:
            raise argument_error("INFINIBRAIN_CONTAINER", "a container's suffix_name has no '/'")
        try:
            keys = security.keys_from_env()
        except security.KeyFileError as exc:
            raise argument_error("INFINIBRAIN_CURVE_SERVER_KEY", str(exc)) from None
        self.max_message_size = _max_size(env.get("INFINIBRAIN_MAX_MESSAGE_SIZE"))
        self._beat_every = _heartbeat_seconds(env.get("INFINIBRAIN_HEARTBEAT_MS"))
        self._last_sent = 0.0
        self._default_batch = _batch_default(env.get("INFINIBRAIN_MAX_BATCH_SIZE"))
        self._batch = 1  # requests per message the manager may send: more once the program asks for batches
        self._items: deque[tuple[dict, Any]] = deque()  # received requests not yet handed out
        self._calls = 0  # calls made to other inferences (their numbers, after this Connector's own token)
        self._call_token = uuid.uuid4().hex[:8]  # a restarted container's late answers never match a new call
        self._answers: dict[str, tuple[dict, Any] | None] = {}  # call number -> its answer (None: still waiting)
        self._serving: InferenceResponse | None = None  # the request last handed out: a call's parent by default
        self._shares_shm = False  # it read the manager's probe: its calls' data may go in shared memory
        self._call_pool: shm.Pool | None = None  # made at the first call that uses it, with its probe
        self._call_probe: shm.Probe | None = None
        self.sub_name = sub_name
        self._shm_probe = env.get("INFINIBRAIN_SHM_PROBE")
        self._shm = shm.Reader()
        allocator.tune()  # message buffers reused, not mapped anew each time (infinibrain/allocator.py)
        self._ctx = context or zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.linger = 0
        self._sub.rcvhwm = 0
        security.arm_client(self._sub, keys)
        self._topic = P.container_topic(self._wire_id, sub_name)
        self._sub.subscribe(self._topic)
        hosts = P.manager_hosts(host_ip)  # a manager group's: connected to all, the leader answers
        P.connect_managers(self._sub, hosts, sub)
        self._poller = zmq.Poller()  # one for the Connector's life: Socket.poll makes one per call
        self._poller.register(self._sub, zmq.POLLIN)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.linger = 1000  # let a last result leave before the program exits
        self._pub.sndhwm = 0
        security.arm_client(self._pub, keys)
        P.connect_managers(self._pub, hosts, pub)
        self._hello()

    def close(self) -> None:
        """Close the sockets (the manager sees the container leave)."""
        self._sub.close()
        self._pub.close()
        if self._call_pool is not None and self._call_probe is not None:
            self._call_pool.close()
            self._call_probe.close()

    def _send(self, kind: str, header: dict, payload: list | tuple = ()) -> None:
        header["cont"] = self._wire_id
        P.send(self._pub, P.encode(P.TOPIC_MANAGER, kind, header, payload))
        self._last_sent = time.monotonic()

    def _hello(self) -> None:
        header = {"sub": self.sub_name, "hb": int(self._beat_every * 1000)}
        if self._batch > 1:
            header["batch"] = self._batch  # send me up to this many requests in one message
        # Whether we see the manager's /dev/shm (read at every hello: a manager that
        # restarted holds a new token): then a large image comes as a segment's name, read
        # here, instead of through two sockets (infinibrain/shm.py).
        token = shm.read_probe(self._shm_probe) if self._shm_probe else None
        if token:
            header["shm"] = token
        self._shares_shm = bool(token)
        self._send(P.HELLO, header)

    # ---- receiving -------------------------------------------------------------------

    def _next(self, timeout: float) -> tuple[dict, Any]:
        """The next request as (header, data frame), waiting up to ``timeout`` seconds
        (0: no limit) and answering the manager's pings meanwhile."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise argument_error("timeout", f"must be a number of seconds >= 0, got {timeout!r}")
        deadline = time.monotonic() + timeout if timeout else None
        while not self._items:
            # Busy, the next request is usually waiting already, and a poll costs more.
            if self._take_waiting():
                continue
            if not self._wait(deadline):
                raise ContainerReceiveTimeoutException(RECEIVE_TIMEOUT_MESSAGE, 401)
            self._take_waiting(polled=True)
        return self._items.popleft()

    def _more(self, count: int) -> list[tuple[dict, Any]]:
        """Up to ``count`` more requests that have arrived already (no waiting)."""
        while len(self._items) < count and self._take_waiting():
            pass
        return [self._items.popleft() for _ in range(min(count, len(self._items)))]

    def _take_waiting(self, polled: bool = False) -> bool:
        """Take one message if one is waiting (``polled``: a poll just said so); whether
        there was one."""
        for frames in P.received(self._sub, 1, polled):
            self._take(frames)
            return True
        return False

    def _take(self, frames: list) -> None:
        """Queue the requests of one received message; answer a ping."""
        try:
            msg = P.decode(frames)
        except P.ProtocolError as exc:
            log.warning("dropped malformed message: %s", exc)
            return
        if msg.topic != self._topic:  # a module whose name ours begins ("scale2" for "scale"): not ours
            return
        if msg.kind == P.REQUEST:
            self._queue(msg.header, msg.payload[0] if msg.payload else b"")
        elif msg.kind == P.REQUESTS:
            items = msg.header.get("items")
            if not isinstance(items, list) or len(items) != len(msg.payload):
                log.warning("dropped a malformed batch of requests (%d frames)", len(msg.payload))
                return
            for item, frame in zip(items, msg.payload):
                self._queue(item, frame)
        elif msg.kind == P.PING:
            self._hello()
        elif msg.kind == P.RESULT:  # the answer of one of our calls (an abandoned call's is dropped)
            rid = msg.header.get("rid")
            if rid in self._answers and self._answers[rid] is None:
                self._answers[rid] = (msg.header, msg.payload[0] if msg.payload else None)

    def _queue(self, h: Any, frame: Any) -> None:
        """Queue one request; its data comes from the client's shared memory when the
        header names a segment. It is copied out at once: the client reuses the segment
        when the request ends, and a program may keep an image longer than that."""
        if not isinstance(h, dict):
            log.warning("dropped a request whose header is not a map")
            return
        if "shm" in h:
            try:
                frame = bytes(self._shm.view(h["shm"]))
            except shm.ShmError as exc:
                log.warning("request %s: its data cannot be read from shared memory: %s", h.get("rid"), exc)
                detail = f"the container could not read the request's shared memory: {exc}"
                self._send(P.RESULT, {"mkey": h.get("mkey"), "code": 999, "msg": format_message(999), "detail": detail})
                return
        self._items.append((h, frame))

    def _wait(self, deadline: float | None, beat: bool = True) -> bool:
        """Wait for a message until ``deadline`` (None: no limit), beating while idle (not
        while a call waits: the module is busy then); False when the deadline passed with
        nothing to receive."""
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return bool(self._poller.poll(0))
            beat_at = self._last_sent + self._beat_every if beat else math.inf
            if now >= beat_at:  # idle: say so
                self._send(P.HEARTBEAT, {"sub": self.sub_name})
                beat_at = now + self._beat_every
            until = beat_at if deadline is None else min(beat_at, deadline)
            if self._poller.poll(max(0, int((until - now) * 1000)) + 1):
                return True

    def _response(self, h: dict) -> InferenceResponse:
        stamp = ["container_receive", P.now()]
        noreply = bool(h.get("noreply"))
        if noreply:  # output=None: the request is done once taken
            self._send(P.TAKEN, {"mkey": h.get("mkey"), "ts": [stamp]})
        return InferenceResponse(
            pid=int(h.get("pid") or 0),
            tid=int(h.get("tid") or 0),
            request_no=str(h.get("rid") or ""),
            inference_name=h.get("inf") or "",
            metadata=h.get("param") or {},
            metadata_sys={"mkey": h.get("mkey"), "container": self.container_id, "noreply": noreply, "arr": h.get("arr"),
                          **({"tp": h["tp"], "rx": time.time_ns()} if "tp" in h else {})},
            sub_inference_name=h.get("sub") or self.sub_name,
            time_stamp=[stamp],
        )

    def _image(self, h: dict, frame: Any) -> tuple[np.ndarray, dict, InferenceResponse]:
        response = self._response(h)
        meta = h.get("arr")
        try:
            image = P.array_from(meta, frame) if meta else np.frombuffer(P.frame_buffer(frame), dtype=np.uint8)
        except P.ProtocolError as exc:
            log.warning("request %s carries a bad image: %s", response.request_no, exc)
            image = np.frombuffer(P.frame_buffer(frame), dtype=np.uint8)
        return image, response.metadata, response

    def _data(self, h: dict, frame: Any) -> tuple[bytes, dict, InferenceResponse]:
        response = self._response(h)
        return P.frame_bytes(frame), response.metadata, response

    def receive_request_image(self, timeout: int = 0) -> tuple[np.ndarray, dict, InferenceResponse]:
        """Wait for an image request (``timeout`` seconds, 0 = no limit).

        Returns (image, additional information, InferenceResponse); 401 on timeout.
        """
        image, param, self._serving = self._image(*self._next(timeout))
        return image, param, self._serving

    def receive_request(self, timeout: int = 0) -> tuple[bytes, dict, InferenceResponse]:
        """Wait for a request (``timeout`` seconds, 0 = no limit).

        Returns (data bytes, additional information, InferenceResponse); 401 on timeout.
        """
        data, param, self._serving = self._data(*self._next(timeout))
        return data, param, self._serving

    def receive_request_image_batch(self, timeout: int = 0, max_size: int | None = None
                                    ) -> list[tuple[np.ndarray, dict, InferenceResponse]]:
        """Wait for at least one image request (``timeout`` seconds, 0 = no limit) and take
        up to ``max_size`` that have arrived: a list of (image, additional information,
        InferenceResponse). Not in the reference: dynamic batching (ContainerConfig's
        ``max_batch_size``, the default ``max_size``). 401 on timeout."""
        return [self._image(h, f) for h, f in self._batch_of(timeout, max_size)]

    def receive_request_batch(self, timeout: int = 0, max_size: int | None = None
                              ) -> list[tuple[bytes, dict, InferenceResponse]]:
        """As ``receive_request_image_batch``, with the data as bytes."""
        return [self._data(h, f) for h, f in self._batch_of(timeout, max_size)]

    def _batch_of(self, timeout: float, max_size: int | None) -> list[tuple[dict, Any]]:
        size = self._batch_size(max_size)
        if size != self._batch:  # tell the manager to send batches of this size
            self._batch = size
            self._hello()
        first = self._next(timeout)
        self._serving = None  # several requests: a call names the one it is made for
        return [first, *self._more(size - 1)]

    def _batch_size(self, max_size: int | None) -> int:
        if max_size is None:
            return self._default_batch
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise argument_error("max_size", f"must be a number of requests >= 1, got {max_size!r}")
        return max_size

    # ---- calling other inferences (not in the reference) -----------------------------

    def infer(self, inference_name: str, data: bytes, param: Any = None, response: InferenceResponse | None = None,
              timeout: float = DEFAULT_CALL_TIMEOUT) -> tuple[Any, InferenceResponse]:
        """Ask another inference, through the manager, as ``AICluster.infer`` does: returns
        (result, InferenceResponse), raises the same exception classes.

        ``response``: the InferenceResponse of the request this call is made for (default:
        the one the last ``receive_request``/``receive_request_image`` handed out; none
        after a batch). The call then has that request's priority and must end by its
        deadline; a call that would wait for an inference already waiting for it (A calls
        B calls A) is refused with 100. ``timeout``: seconds to wait for the answer here
        (401 after them). Requests for this module that arrive meanwhile are kept for the
        next ``receive_request``."""
        return self._call(inference_name, data, param, False, response, timeout)

    def infer_image(self, inference_name: str, image: np.ndarray, param: Any = None,
                    response: InferenceResponse | None = None, timeout: float = DEFAULT_CALL_TIMEOUT) -> Any:
        """As ``infer`` with an image (a numpy array, which arrives as one): returns the
        result, as ``AICluster.infer_image`` does."""
        return self._call(inference_name, image, param, True, response, timeout)[0]

    def _call(self, inference_name: Any, data: Any, param: Any, image: bool, response: InferenceResponse | None,
              timeout: float) -> tuple[Any, InferenceResponse]:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise argument_error("timeout", f"must be a number of seconds > 0, got {timeout!r}")
        self._calls += 1
        number = f"{self._call_token}-{self._calls}"
        header, frame = call_message(number, inference_name, data, param, image, self.sub_name, response or self._serving)
        segment = self._call_segment(header, frame)
        if segment is None:
            check_size(frame, image, self.max_message_size)
        self._answers[number] = None
        try:
            self._send(P.CALL, header, [] if segment is not None else [frame])
            deadline = time.monotonic() + timeout
            while self._answers[number] is None:
                if self._take_waiting():
                    continue
                if not self._wait(deadline, beat=False):  # busy, not idle: no idle beats meanwhile
                    segment = None  # the manager may still read it: not reused
                    raise make_error(401, detail=f"no answer from {header['inf']!r} within {timeout:g} s")
            answer, frame = self._answers[number]  # type: ignore[misc]
        finally:
            del self._answers[number]
            if segment is not None and self._call_pool is not None:
                self._call_pool.give(segment)
        return call_outcome(header["inf"], answer, frame)

    def _call_segment(self, header: dict, data: Any) -> shm.Segment | None:
        """A call's data of ``shm.MIN_BYTES`` or more in a segment of ours, named in
        ``header`` (when this Connector shares /dev/shm with the manager), else None."""
        view = memoryview(data)
        if not self._shares_shm or view.nbytes < shm.MIN_BYTES or not view.c_contiguous:
            return None
        if self._call_pool is None:
            owner = shm.caller_owner(self._wire_id)
            try:
                shm.sweep_once()  # segments of processes that were killed
                self._call_probe = shm.Probe(shm.probe_name(owner), owner)
            except OSError:
                self._shares_shm = False
                return None
            # Numbered from a random start: the owner is the instance's, and a restarted
            # process must not reuse a name a reader still has mapped.
            self._call_pool = shm.Pool(owner, first=int.from_bytes(os.urandom(3), "big") << 8)
        segment = self._call_pool.take(view.nbytes)
        if segment is not None:
            header["shm"] = segment.write(view)
        return segment

    # ---- sending ---------------------------------------------------------------------

    def send_response(self, result: Any, response: InferenceResponse) -> None:
        """Send ``result`` (list, tuple, dict, str, int, float, bool; numpy scalars are made
        plain, numpy arrays reach the caller as arrays of their dtype and shape) back for
        the request ``response`` came with.

        A program whose inference has ``input=None`` and ``output='Main'`` produces results
        on its own: it passes a new ``InferenceResponse()``, and the result goes to every
        AICluster's infer callback. An exception instance as ``result`` ends the request
        with 999 and the exception's text, an InfinibrainException with its own code
        (not in the reference).
        """
        answer = self._answer(result, response)
        if response is self._serving:
            self._serving = None  # answered: a later call is made for no request
        if answer is not None:
            self._send(P.RESULT, answer[0], [answer[1]])

    def send_response_batch(self, results: list, responses: list[InferenceResponse]) -> None:
        """Send the results of several requests in one message (each to its own caller):
        ``results[i]`` answers ``responses[i]``, as ``send_response`` would. Not in the
        reference: the companion of ``receive_request_batch``."""
        if not isinstance(results, (list, tuple)) or not isinstance(responses, (list, tuple)):
            raise argument_error("results", "results and responses must be lists")
        if len(results) != len(responses):
            raise argument_error("results", f"{len(results)} results for {len(responses)} requests: give one result per request")
        answers = [a for a in map(self._answer, results, responses) if a is not None]
        if any(h["mkey"] is None for h, _ in answers):  # produced results have no batch form
            for header, packed in answers:
                self._send(P.RESULT, header, [packed])
        elif answers:
            self._send(P.RESULTS, {"items": [h for h, _ in answers]}, [packed for _, packed in answers])

    def _answer(self, result: Any, response: InferenceResponse) -> tuple[dict, bytes] | None:
        """(header, packed result) answering ``response``'s request; None for a request
        whose inference wants no answer (output=None)."""
        meta = response.metadata_sys or {}
        if meta.get("noreply"):
            return None
        code, detail, message = 0, "", ""
        if isinstance(result, InfinibrainException):  # a numbered error: the caller gets its class
            code, message, detail, result = result.code, result.message, result.detail, None
        elif isinstance(result, BaseException):
            code, detail, result = 999, f"the inference failed: {type(result).__name__}: {result}", None
        try:
            packed = P.pack_value(result)
        except (TypeError, ValueError, OverflowError) as exc:
            code, detail = 999, f"the inference's result cannot be sent: {exc}"
            packed = P.pack_value(None)
        if len(packed) > self.max_message_size:
            # The manager would drop the connection on it; the caller gets a numbered error instead.
            code = 999
            detail = f"the inference's result is {len(packed)} bytes, more than the manager's max_message_size of {self.max_message_size}"
            packed = P.pack_value(None)
        stamps = [list(s) for s in (response.time_stamp or [])] + [["container_send", P.now()]]
        header = {"mkey": meta.get("mkey"), "code": code, "msg": message or (format_message(code) if code else ""),
                  "detail": detail, "ts": stamps}
        if "rx" in meta:  # a traced request: its span in this container, as timed here
            header["cs"] = [meta["rx"], time.time_ns()]
        if meta.get("mkey") is None:
            header["resp"] = {"sub_inference_name": self.sub_name, "metadata": response.metadata or {}, "time_stamp": stamps}
        return header, packed


def _heartbeat_seconds(value: str | None) -> float:
    try:
        ms = int(value) if value else 2500
    except ValueError:
        raise argument_error("INFINIBRAIN_HEARTBEAT_MS", f"must be a number of milliseconds, got {value!r}") from None
    return max(ms, 10) / 1000


def _batch_default(value: str | None) -> int:
    try:
        return max(int(value), 1) if value else P.DEFAULT_MAX_BATCH_SIZE
    except ValueError:
        raise argument_error("INFINIBRAIN_MAX_BATCH_SIZE", f"must be a number of requests, got {value!r}") from None


def _max_size(value: str | None) -> int:
    try:
        return int(value) if value else P.DEFAULT_MAX_MESSAGE_SIZE
    except ValueError:
        raise argument_error("INFINIBRAIN_MAX_MESSAGE_SIZE", f"must be a number of bytes, got {value!r}") from None


def _port(value: Any, name: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise argument_error(name, "" if value is None else f"must be a port number, got {value!r}") from None
    if not 0 < port < 65536:
        raise argument_error(name, f"must be a port number, got {value!r}")
    return port


__all__ = ["Connector"]
