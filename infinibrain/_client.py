"""The client core behind AICluster: sockets, one I/O thread, one callback thread.

Every call, sync or ``_async``, becomes a ``Pending`` (a request number, and a
``concurrent.futures.Future`` or a callback). The sync facade waits on the future; the
``_async`` facade returns the request number at once and its callback runs on the
callback thread. A synchronous inference's answer comes to the calling thread's own
socket (``DirectReply``), which that thread reads itself; everything else arrives on the
I/O thread. Nothing here knows which API is being served.

Guarantees:
- every pending call ends: with its answer, or a numbered error when the manager does not
  acknowledge it (402/111), does not answer in the time it announced (401), or is lost
  (heartbeat silence or a manager restart: 402 for inference, 111 for management);
- keepalive: loss and recovery of the manager reach the manage callback as 112 and 113,
  and the client reconnects by itself;
- a user callback that raises is logged; the threads go on.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import queue
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import allocator
from . import protocol as P
from . import security
from . import shm
from .errors import error_from_code, format_message, make_error
from .retry import NO_RETRY, RetryPolicy
from .types import InferenceResponse

log = logging.getLogger("infinibrain.client")

ACK_TIMEOUT = 5.0  # a manager that is alive acknowledges within milliseconds
ANSWER_GRACE = 2.0  # beyond the deadline the manager announced, before we give up ourselves
COMMAND_TIMEOUT = 3600.0  # bound on a management command once acknowledged
LIVENESS = 4  # heartbeats missed before the manager counts as lost
TIMER_INTERVAL_MS = 20  # deadlines and heartbeats are looked at this often
DIRECT_SOCKETS = 32  # threads per AICluster that receive their synchronous answers themselves
DIRECT_PROOF = 1.0  # seconds a thread's socket may take to prove it is subscribed, else the I/O thread serves it
# Frames smaller than this are copied when sent (one memcpy) rather than handed to pyzmq's
# zero-copy machinery (a tracker and its garbage-collector thread per frame), which costs
# more for an image of a few hundred kB; larger ones go zero-copy.
COPY_THRESHOLD = 1 << 20

_request_numbers = itertools.count(1)


def next_request_no() -> str:
    """Request acceptance numbers: unique within this process (together with the pid, cluster-wide)."""
    return str(next(_request_numbers))


Callback = Callable[[int, str, Any, Any], None]


class Pending:
    """One call waiting for its answer: a request number, what to do with the answer, and
    (for the sync and ``_future`` forms) the future that carries it."""

    __slots__ = ("rid", "kind", "deadline", "future", "on_done", "on_progress", "cmd", "acked", "inference", "tid", "param",
                 "result_only", "segment")

    def __init__(self, rid: str, kind: str, deadline: float, *, on_done: Callback | None = None,
                 on_progress: Callable[[str, dict], None] | None = None, cmd: str = "", inference: str = "", tid: int = 0,
                 param: dict | None = None, result_only: bool = False) -> None:
        self.rid = rid
        self.kind = kind  # "infer" or "cmd"
        self.deadline = deadline
        # An ``_async`` call has its callback only; every other form waits on a future.
        self.future: concurrent.futures.Future | None = concurrent.futures.Future() if on_done is None else None
        self.on_done = on_done  # (code, message, result, response)
        self.on_progress = on_progress  # (cmd, info): progress events of a slow command
        self.cmd = cmd
        self.acked = False
        self.inference = inference
        self.tid = tid
        self.param = param  # what was sent as additional information (InferenceResponse.metadata)
        # The future's value is the result alone (infer_image, infer_image_future), not
        # (result, InferenceResponse): the response is then never built.
        self.result_only = result_only
        self.segment: shm.Segment | None = None  # the shared memory its payload is in, until it ends

    def wait(self) -> Any:
        """The answer, or its numbered exception (bounded even if the I/O thread died)."""
        assert self.future is not None, "an _async call has no future to wait on"
        bound = None if self.deadline == float("inf") else max(self.deadline - time.monotonic(), 0) + COMMAND_TIMEOUT
        try:
            return self.future.result(timeout=bound)
        except concurrent.futures.TimeoutError:
            raise make_error(401, detail=f"no answer to request {self.rid}") from None


def arrived(sock: zmq.Socket, logger: logging.Logger | logging.LoggerAdapter) -> Iterator[P.Message]:
    """The messages waiting on ``sock`` once a poll has said one is, at most 256 (so one
    busy socket cannot hold its reader for ever); a malformed one is logged and dropped."""
    for frames in P.received(sock, 256, polled=True):
        try:
            msg = P.decode(frames)
        except P.ProtocolError as exc:
            logger.warning("dropped malformed message from the manager: %s", exc)
            continue
        yield msg


class DirectReply:
    """A calling thread's own SUB socket: the answers to its synchronous inference requests
    come straight to it (topic ``protocol.reply_topic``), as a raw client's do, instead of
    through the I/O thread and a wake-up (docs/DECISIONS.md, "Synchronous answers").

    Used only by its thread, under ``lock``; ``close`` takes the lock, so a socket is
    never closed while its thread waits on it."""

    _tags = itertools.count(1)

    def __init__(self, ctx: zmq.Context, keys: Any, client_id: str, address: str) -> None:
        self.tag = str(next(self._tags))
        self.thread = threading.current_thread()
        self.lock = threading.Lock()
        self.proven = -1  # the connection generation in which the manager answered on this socket
        self.sock = ctx.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.rcvhwm = 0
        security.arm_client(self.sock, keys)
        self.sock.subscribe(P.reply_topic(client_id, self.tag))
        self.sock.connect(address)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

    def messages(self, timeout_ms: int) -> list[P.Message]:
        """What arrived within ``timeout_ms`` (malformed messages dropped). Only its thread's
        answers come here, so reading all that waits loses nothing."""
        return list(arrived(self.sock, log)) if self.poller.poll(timeout_ms) else []

    def close(self) -> None:
        if self.lock.acquire(timeout=1.0):  # its thread notices the client closing within a poll slice
            self.sock.close(linger=0)
            self.lock.release()


class ClusterClient:
    def __init__(self, host: str, port: int, connect_timeout: float,
                 logger: logging.Logger | logging.LoggerAdapter | None = None) -> None:
        self.host, self.port = host, port
        self.logger = logger or log
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:10]}"
        self.pid = os.getpid()
        self.connect_timeout = connect_timeout
        self.manage_callback: Callable | None = None  # (code, message, cmd, result)
        self.infer_callback: Callable | None = None  # (code, message, result, response)
        self.progress_callback: Callable | None = None  # (cmd, info): progress of slow commands (not in the reference)
        self.connected = False
        self.retry: RetryPolicy = NO_RETRY  # AICluster(retry=...) sets it
        self.manager_id: str | None = None
        self.hb_interval = 0.5
        self.max_message_size = P.DEFAULT_MAX_MESSAGE_SIZE  # the manager says its own in hello_ack
        self.no_input: frozenset[str] = frozenset()  # inferences with input=None, as the manager tells
        self._refused = ""  # why the manager refused our connection (CURVE), from the socket monitor
        self._acked_paths: set[str] = set()
        self._last_heard = 0.0
        self._next_beat = 0.0
        self._next_hello = 0.0
        self._closed = False
        self._pending: dict[str, Pending] = {}
        self._send_lock = threading.Lock()
        self._link = threading.Condition()
        self._callbacks: queue.SimpleQueue = queue.SimpleQueue()
        self._direct = threading.local()  # this thread's DirectReply
        self._directs: list[DirectReply] = []
        self._directs_lock = threading.Lock()
        self._generation = 0  # counts connection losses: a thread's socket proves itself again after one
        self._probe, self._pool = self._shared_memory()
        self._shm_ok = False  # the manager said it reads our segments (hello_ack "shm")
        allocator.tune()  # message buffers reused, not mapped anew each time (infinibrain/allocator.py)
        self._open_sockets()
        self._io = threading.Thread(target=self._io_loop, name=f"infinibrain-io-{self.id}", daemon=True)
        self._cb = threading.Thread(target=self._callback_loop, name=f"infinibrain-cb-{self.id}", daemon=True)
        self._io.start()
        self._cb.start()

    # ---- sockets -------------------------------------------------------------------

    def _open_sockets(self) -> None:
        try:
            keys = security.client_keys(self.host, self.port)
        except security.KeyFileError as exc:
            raise make_error(110, detail=f"CURVE keys: {exc}") from None
        self._keys = keys
        self._ctx = zmq.Context()
        base = f"tcp://{self.host}:"
        self._client_out = base + str(self.port + P.CLIENT_OUT)

        def pub(offset: int) -> zmq.Socket:
            s = self._ctx.socket(zmq.PUB)
            s.linger = 0
            security.arm_client(s, keys)
            s.sndhwm = 0  # never drop silently; the manager's queue bound answers with 305
            s.copy_threshold = COPY_THRESHOLD
            s.connect(base + str(self.port + offset))
            return s

        self._paths = {"infer": pub(P.INFER_IN), "mgmt": pub(P.MGMT_IN)}
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.linger = 0
        self._sub.rcvhwm = 0
        security.arm_client(self._sub, keys)
        # A refused key or a security mismatch shows only here: the manager never answers.
        self._monitor = self._sub.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        )
        for topic in (P.client_topic(self.id), P.TOPIC_HEARTBEAT, P.TOPIC_EVENT):
            self._sub.subscribe(topic)
        self._sub.connect(base + str(self.port + P.CLIENT_OUT))
        self._wake_r, self._wake_w = os.pipe()

    def _shared_memory(self) -> tuple[shm.Probe | None, shm.Pool | None]:
        """The probe and segments of large payloads (infinibrain/shm.py); (None, None) when
        this host offers none or INFINIBRAIN_SHM_BYTES=0."""
        if shm.LIMIT_BYTES <= 0 or not shm.available():
            return None, None
        try:
            shm.sweep_once()
            return shm.Probe(shm.probe_name(self.id), self.id), shm.Pool(self.id)
        except OSError as exc:
            self.logger.info("no shared memory for large payloads (%s): they go in frames", exc)
            return None, None

    def _hello(self, path: str, to: str | None = None) -> None:
        header: dict[str, Any] = {"path": path}
        if to is not None:
            header["to"] = to
        if self._probe is not None and path == "infer":
            header["shm"] = self._probe.name  # read it, and you may read our segments
        self._send(path, P.HELLO, header)

    def _send(self, path: str, kind: str, header: dict, payload: list | tuple = ()) -> None:
        header.setdefault("cid", self.id)
        header.setdefault("pid", self.pid)
        frames = P.encode(P.TOPIC_MANAGER, kind, header, payload)
        with self._send_lock:
            if self._closed:
                raise make_error(111, detail="this AICluster was released")
            P.send(self._paths[path], frames)

    # ---- connection ------------------------------------------------------------------

    def handshake(self, timeout: float | None = None) -> None:
        """Prove both paths to the manager work (110 if neither does, 111 if one fails)."""
        timeout = self.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._link:
            self._acked_paths.clear()
        while time.monotonic() < deadline:
            for path in ("infer", "mgmt"):
                if path not in self._acked_paths:
                    self._hello(path)
            with self._link:
                self._link.wait_for(lambda: len(self._acked_paths) == 2 or bool(self._refused), timeout=0.05)
                if len(self._acked_paths) == 2:
                    return
                if self._refused:
                    raise make_error(110, detail=f"the manager at {self.host}:{self.port} refused the connection: {self._refused}")
        with self._link:
            acked = set(self._acked_paths)
        where = f"manager at {self.host}:{self.port}"
        if not acked:
            raise make_error(110, detail=f"no answer from the {where} within {timeout:g} s")
        missing = ({"infer", "mgmt"} - acked).pop()
        port = self.port + (P.INFER_IN if missing == "infer" else P.MGMT_IN)
        raise make_error(111, detail=f"{'inference' if missing == 'infer' else 'management'} port {port} of the {where} did not answer")

    def check_connected(self) -> None:
        if self._closed:
            raise make_error(111, detail="this AICluster was released")
        if not self.connected:
            raise make_error(111, detail=f"not connected to the manager at {self.host}:{self.port}")

    @property
    def lost(self) -> bool:
        """The connection was made, and is lost now (until it comes back)."""
        return not self.connected and not self._closed and self.manager_id is not None

    def close(self) -> None:
        if self._closed:
            return
        with self._send_lock:
            self._closed = True
        os.write(self._wake_w, b"x")
        self._io.join(timeout=5)
        self._fail_all(111, "this AICluster was released")
        self._callbacks.put(None)
        if threading.current_thread() is not self._cb:
            self._cb.join(timeout=5)
        with self._directs_lock:
            directs, self._directs = self._directs, []
        for d in directs:
            d.close()
        for s in (*self._paths.values(), self._monitor, self._sub):
            s.close(linger=0)
        self._ctx.term()
        if self._pool is not None and self._probe is not None:
            self._pool.close()
            self._probe.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- calls ------------------------------------------------------------------------

    def command(self, cmd: str, args: dict, on_done: Callable | None = None, on_progress: Callable | None = None) -> Pending:
        self.check_connected()
        p = Pending(next_request_no(), "cmd", time.monotonic() + ACK_TIMEOUT, on_done=on_done, on_progress=on_progress, cmd=cmd)
        self._pending[p.rid] = p
        try:
            self._send("mgmt", P.COMMAND, {"rid": p.rid, "cmd": cmd, "args": args})
        except BaseException:
            self._pending.pop(p.rid, None)
            raise
        return p

    def infer(self, inference: str, payload: Any, arr: dict | None, param: dict, on_done: Callable | None = None,
              result_only: bool = False, direct: DirectReply | None = None, detached: bool = False) -> Pending:
        """Send one inference request; ``result_only``: its future carries the result alone;
        ``direct``: its answer goes to that socket of the calling thread (``wait_direct``);
        ``detached``: the caller may change ``payload`` once this returns."""
        self.check_connected()
        tid = threading.get_native_id()
        p = Pending(next_request_no(), "infer", time.monotonic() + ACK_TIMEOUT, on_done=on_done, inference=inference, tid=tid,
                    param=param, result_only=result_only)
        header = {"rid": p.rid, "tid": tid, "inf": inference, "param": param, "arr": arr, "ts": [["client_send", P.now()]]}
        if direct is not None:
            header["to"] = direct.tag
        if result_only:
            header["lean"] = True  # a result needs no InferenceResponse fields
        frames = self._payload(p, header, payload, detached)
        self._pending[p.rid] = p
        try:
            self._send("infer", P.REQUEST, header, frames)
        except BaseException:
            self._pending.pop(p.rid, None)
            self._release(p)
            raise
        return p

    def _payload(self, p: Pending, header: dict, payload: Any, detached: bool) -> tuple:
        """The frames that carry ``payload``: none when it goes in shared memory (header
        ``shm``), else one. A detached caller's writable buffer is copied before a
        zero-copy send (ZeroMQ copies one below COPY_THRESHOLD as it sends)."""
        view = memoryview(payload)
        if self._shm_ok and view.nbytes >= shm.MIN_BYTES and view.c_contiguous:
            assert self._pool is not None
            p.segment = self._pool.take(view.nbytes)
            if p.segment is not None:
                header["shm"] = p.segment.write(view)
                return ()
        if detached and not view.readonly and view.nbytes >= COPY_THRESHOLD:
            payload = payload.copy() if hasattr(payload, "copy") else bytes(view)
        return (payload,)

    def _release(self, p: Pending) -> None:
        if p.segment is not None and self._pool is not None:
            self._pool.give(p.segment)
            p.segment = None

    # ---- synchronous answers straight to the calling thread ----------------------------

    def direct_reply(self) -> DirectReply | None:
        """The calling thread's own answer socket, proven subscribed in this connection;
        None (answers come through the I/O thread) when it cannot be had."""
        d: DirectReply | None = getattr(self._direct, "reply", None)
        if d is None:
            d = self._new_direct()
            if d is None:
                return None
        if d.proven != self._generation and not self._prove(d):
            return None
        return d

    def _new_direct(self) -> DirectReply | None:
        with self._directs_lock:
            if self._closed:
                return None
            gone = [d for d in self._directs if not d.thread.is_alive()]
            for d in gone:  # its thread ended: nobody uses it any more
                self._directs.remove(d)
                d.close()
            if len(self._directs) >= DIRECT_SOCKETS:
                return None
            d = DirectReply(self._ctx, self._keys, self.id, self._client_out)
            self._directs.append(d)
        self._direct.reply = d
        return d

    def _prove(self, d: DirectReply) -> bool:
        """Have the manager answer a hello on ``d`` (a SUB socket drops what arrives before
        its subscription has reached the manager)."""
        generation = self._generation
        deadline = time.monotonic() + DIRECT_PROOF
        with d.lock:
            while time.monotonic() < deadline and not self._closed:
                self._hello("infer", d.tag)
                if any(m.kind == P.HELLO_ACK for m in d.messages(50)):
                    d.proven = generation
                    return True
        self.logger.debug("thread socket %s not answered within %g s: answers come through the I/O thread", d.tag, DIRECT_PROOF)
        return False

    def wait_direct(self, p: Pending, d: DirectReply) -> Any:
        """``p.wait()`` for a request answered on ``d``: this thread receives its answer
        itself. Whatever ends a call otherwise (a deadline, a lost connection, release)
        still ends it: the I/O thread completes the future and this loop sees it within
        a poll slice."""
        assert p.future is not None
        future = p.future
        with d.lock:
            while not future.done() and not self._closed and time.monotonic() < p.deadline + COMMAND_TIMEOUT:
                for msg in d.messages(TIMER_INTERVAL_MS):
                    if msg.kind == P.RESULT:  # its own, or a late answer to an earlier call (dropped)
                        self._on_result(msg)
        return p.wait()

    def deliver(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the callback thread."""
        self._callbacks.put((fn, args))

    def _finish(self, p: Pending, code: int, message: str, result: Any = None, response: Any = None, detail: str = "") -> None:
        """End ``p``: its future, or its callback (which gets the reference's message only)."""
        self._release(p)
        future = p.future
        if future is not None:
            if code:
                exc = error_from_code(code, message, detail)
                exc.response = response  # type: ignore[attr-defined]
                future.set_exception(exc)
            elif p.kind == "cmd" or p.result_only:
                future.set_result(result)
            else:
                future.set_result((result, response))
            return
        if code and detail:
            # A callback gets the reference's message only: the detail is in the log.
            self.logger.debug("request %s ended with [%d] %s: %s", p.rid, code, message, detail)
        if p.on_done is not None:
            self.deliver(p.on_done, code, message, result if code == 0 else None, response)

    def _fail_all(self, infer_code: int, why: str) -> None:
        for rid in list(self._pending):
            p = self._pending.pop(rid, None)
            if p is not None:
                code = infer_code if p.kind == "infer" else 111
                self._finish(p, code, format_message(code), response=self._bare_response(p), detail=why)

    def _bare_response(self, p: Pending) -> InferenceResponse | None:
        if p.kind != "infer":
            return None
        return InferenceResponse(pid=self.pid, tid=p.tid, request_no=p.rid, inference_name=p.inference)

    # ---- the I/O thread -------------------------------------------------------------------

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_timers = 0.0
        while not self._closed:
            try:
                for sock, _ in poller.poll(TIMER_INTERVAL_MS):
                    if sock is self._sub:
                        self._drain()
                    elif sock is self._monitor:
                        self._on_monitor()
                now = time.monotonic()
                if now >= next_timers:  # not after every message: they look at every pending call
                    next_timers = now + TIMER_INTERVAL_MS / 1000
                    self._timers()
            except Exception as exc:  # the I/O thread must outlive any single bad message
                if self._closed:
                    return
                self.logger.exception("client I/O loop error: %s", exc)

    def _drain(self) -> None:
        for msg in arrived(self._sub, self.logger):
            self._last_heard = time.monotonic()
            handler = self._handlers.get(msg.kind)
            if handler is not None:
                handler(self, msg)

    def _on_monitor(self) -> None:
        event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = f"it does not accept this client's CURVE key (ZAP status {event['value']}); add the key's public file to its curve_client_keys"
        elif self._keys is None:
            why = "the security handshake failed: the manager may require CURVE (set INFINIBRAIN_CURVE_SERVER_KEY and INFINIBRAIN_CURVE_CLIENT_KEY)"
        else:
            why = "the CURVE handshake failed: check INFINIBRAIN_CURVE_SERVER_KEY, or the manager does not use CURVE"
        with self._link:
            if not self._refused:
                self.logger.warning("manager at %s:%d: %s", self.host, self.port, why)
            self._refused = why
            self._link.notify_all()

    def _on_hello_ack(self, msg: P.Message) -> None:
        h = msg.header
        self.hb_interval = float(h.get("hb") or 0.5)
        if isinstance(h.get("max"), int) and h["max"] > 0:
            self.max_message_size = h["max"]
        self._takes_no_input(h)
        if h.get("path") == "infer":
            self._shm_ok = h.get("shm") is True and self._pool is not None
        with self._link:
            self._refused = ""  # whatever refused us before, this path works now
            self._acked_paths.add(str(h.get("path")))
            if len(self._acked_paths) == 2 and not self.connected:
                recovered = self.manager_id is not None
                self.manager_id = h.get("mid")
                self.connected = True
                self._link.notify_all()
                if recovered:
                    self.logger.info("connection to the manager restored")
                    self._event(113, format_message(113), "keepalive", None)
            self._link.notify_all()

    def _on_heartbeat(self, msg: P.Message) -> None:
        mid = msg.header.get("mid")
        if self.connected and self.manager_id is not None and mid != self.manager_id:
            self._lost("the manager restarted")

    def _on_ack(self, msg: P.Message) -> None:
        p = self._pending.get(str(msg.header.get("rid")))
        if p is not None and not p.acked:
            p.acked = True
            timeout = msg.header.get("timeout")
            if p.kind == "infer" and timeout is None and "timeout" in msg.header:
                p.deadline = float("inf")  # no answer limit: the manager's liveness still ends it
            else:
                p.deadline = time.monotonic() + (float(timeout) + ANSWER_GRACE if timeout else COMMAND_TIMEOUT)

    def _on_result(self, msg: P.Message) -> None:
        h = msg.header
        p = self._pending.pop(str(h.get("rid")), None)
        if p is None:
            return
        code = int(h.get("code") or 0)
        result = None
        if code == 0:
            try:
                result = P.unpack_value(msg.payload[0]) if msg.payload else None
            except P.ProtocolError as exc:
                code, h["msg"], h["detail"] = 999, format_message(999), f"result could not be decoded: {exc}"
        # The InferenceResponse is built only for a form that hands it out.
        response = None if (code == 0 and p.result_only) else self._response(p, h.get("resp"))
        self._finish(p, code, h.get("msg") or "", result, response, h.get("detail") or "")

    def _on_reply(self, msg: P.Message) -> None:
        h = msg.header
        p = self._pending.pop(str(h.get("rid")), None)
        if p is None:
            return
        code = int(h.get("code") or 0)
        result = P.unpack_value(msg.payload[0]) if (code == 0 and msg.payload) else None
        self._finish(p, code, h.get("msg") or "", result, detail=h.get("detail") or "")

    def _on_progress(self, msg: P.Message) -> None:
        p = self._pending.get(str(msg.header.get("rid")))
        listener = (p.on_progress or self.progress_callback) if p is not None else None
        if listener is not None and isinstance(msg.header.get("info"), dict):
            self.deliver(listener, p.cmd, msg.header["info"])  # type: ignore[union-attr]

    def _takes_no_input(self, h: dict) -> None:
        """The inferences the manager would refuse requests for (input=None): it tells in
        its hello_ack and whenever the list changes, so the SDK refuses them at call time."""
        if isinstance(h.get("no_input"), list):
            self.no_input = frozenset(n for n in h["no_input"] if isinstance(n, str))

    def _on_event(self, msg: P.Message) -> None:
        h = msg.header
        if h.get("what") == "inputs":
            return self._takes_no_input(h)
        if h.get("what") == "result":
            if self.infer_callback is not None:
                result = P.unpack_value(msg.payload[0]) if msg.payload else None
                response = InferenceResponse.from_dict(h.get("resp"))
                self.deliver(self.infer_callback, 0, "", result, response)
        else:
            self._event(int(h.get("code") or 0), h.get("msg") or "", h.get("what") or "", h.get("info"))

    _handlers: dict[str, Callable[["ClusterClient", P.Message], None]] = {
        P.HELLO_ACK: _on_hello_ack,
        P.HEARTBEAT: _on_heartbeat,
        P.ACK: _on_ack,
        P.RESULT: _on_result,
        P.REPLY: _on_reply,
        P.EVENT: _on_event,
        P.PROGRESS: _on_progress,
    }

    def _response(self, p: Pending, data: Any) -> InferenceResponse:
        """The InferenceResponse of an answer: what only the manager knows (where it ran, the
        module, the time stamps) from ``data``, the rest from the request itself."""
        data = data if isinstance(data, dict) else {}
        given = data.get("time_stamp")
        stamps = list(given) if isinstance(given, list) else []  # the decoder's fresh lists: ours to keep
        stamps.append(["client_receive", P.now()])
        try:
            elapsed = [[f"{a[0]}->{b[0]}", b[1] - a[1]] for a, b in zip(stamps, stamps[1:])]
            elapsed.append(["total", stamps[-1][1] - stamps[0][1]])
        except (TypeError, IndexError, KeyError):  # stamps not [stage, seconds]: the answer still ends its call
            elapsed = []
        return InferenceResponse(pid=self.pid, tid=p.tid, request_no=p.rid, inference_name=p.inference,
                                 metadata=p.param if p.param is not None else {}, metadata_sys=data.get("metadata_sys") or {},
                                 sub_inference_name=data.get("sub_inference_name") or "", time_stamp=stamps,
                                 elapsed_time=elapsed)

    def _event(self, code: int, message: str, cmd: str, result: Any) -> None:
        if self.manage_callback is not None:
            self.deliver(self.manage_callback, code, message, cmd, result)

    def _timers(self) -> None:
        if self._closed:
            return
        now = time.monotonic()
        for p in list(self._pending.values()):
            if p.deadline <= now and self._pending.pop(p.rid, None) is not None:
                if not p.acked:
                    code = 402 if p.kind == "infer" else 111
                    why = f"the manager did not acknowledge request {p.rid}"
                else:
                    code, why = (401, f"no answer to request {p.rid} in time") if p.kind == "infer" else (111, f"no reply to command {p.rid}")
                self._finish(p, code, format_message(code), response=self._bare_response(p), detail=why)
        if self.manager_id is None:
            return  # still in the first handshake
        if self.connected:
            if now - self._last_heard > LIVENESS * self.hb_interval:
                self._lost(f"no heartbeat for {now - self._last_heard:.1f} s")
            elif now >= self._next_beat:
                self._next_beat = now + self.hb_interval
                self._send("mgmt", P.HEARTBEAT, {})
        elif now >= self._next_hello:
            self._next_hello = now + min(self.hb_interval, 0.5)
            for path in ("infer", "mgmt"):
                self._hello(path)

    def _lost(self, why: str) -> None:
        self.logger.warning("connection to the manager lost: %s", why)
        with self._link:
            self.connected = False
            self._acked_paths.clear()
            self._shm_ok = False  # the manager that comes back proves it again
            self._generation += 1  # threads' sockets prove themselves again
        self._fail_all(402, f"connection to the manager lost ({why})")
        self._event(112, format_message(112), "keepalive", None)
        self._next_hello = 0.0

    # ---- the callback thread -------------------------------------------------------------

    def _callback_loop(self) -> None:
        while True:
            item = self._callbacks.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:  # an application's callback must not stop the SDK
                self.logger.exception("callback %s raised", getattr(fn, "__name__", fn))


__all__ = ["ClusterClient", "Pending", "next_request_no"]
