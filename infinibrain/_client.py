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

import logging
import os
import threading
import time
import uuid
from typing import Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import allocator
from . import protocol as P
from .tracing import current_traceparent
from . import security
from ._callbacks import CallbackThread
from ._direct import DirectReplies, DirectReply, arrived
from ._outbox import COPY_THRESHOLD, Outbox
from ._pending import ACK_TIMEOUT, Pending, Waiting, next_request_no, response_of
from .errors import argument_error, format_message, make_error
from .retry import NO_RETRY, RetryPolicy
from .types import InferenceResponse

log = logging.getLogger("infinibrain.client")

LIVENESS = 4  # heartbeats missed before the manager counts as lost
TIMER_INTERVAL_MS = 20  # deadlines and heartbeats are looked at this often

class ClusterClient:
    def __init__(self, host: str, port: int, connect_timeout: float,
                 logger: logging.Logger | logging.LoggerAdapter | None = None) -> None:
        self.host, self.port = host, port
        self.hosts = P.manager_hosts(host)  # a manager group's: connected to all, the leader answers
        self._logger = logger or log
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
        self.max_header_size = P.DEFAULT_MAX_HEADER_SIZE  # likewise
        self.no_input: frozenset[str] = frozenset()  # inferences with input=None, as the manager tells
        self._refused = ""  # why the manager refused our connection (CURVE), from the socket monitor
        self._acked_paths: set[str] = set()
        self._last_heard = 0.0
        self._next_beat = 0.0
        self._next_hello = 0.0
        self._closed = False
        self._send_lock = threading.Lock()
        self._link = threading.Condition()
        self._generation = 0  # counts connection losses: a thread's socket proves itself again after one
        self._outbox = Outbox(self.id, self.logger)
        allocator.tune()  # message buffers reused, not mapped anew each time (infinibrain/allocator.py)
        self._open_sockets()
        self._directs = DirectReplies(self._ctx, self._keys, self.id, self._client_out, lambda tag: self._hello("infer", tag),
                                      self._on_result, self.logger)
        self._callbacks = CallbackThread(f"infinibrain-cb-{self.id}", self.logger)
        self._waiting = Waiting(self.pid, self._outbox, self._callbacks, self.logger)
        self._io = threading.Thread(target=self._io_loop, name=f"infinibrain-io-{self.id}", daemon=True)
        self._io.start()

    @property
    def logger(self) -> logging.Logger | logging.LoggerAdapter:
        return self._logger

    @logger.setter
    def logger(self, logger: logging.Logger | logging.LoggerAdapter) -> None:
        """Every part of the client logs there from now on (AICluster.set_logger)."""
        self._logger = logger
        self._callbacks.logger = self._waiting.logger = self._directs.logger = logger

    # ---- sockets -------------------------------------------------------------------

    def _open_sockets(self) -> None:
        try:
            keys = security.client_keys(self.hosts[0], self.port)  # a group has one server key
        except security.KeyFileError as exc:
            raise make_error(110, detail=f"CURVE keys: {exc}") from None
        self._keys = keys
        self._ctx = zmq.Context()
        self._client_out = (self.hosts, self.port + P.CLIENT_OUT)

        def pub(offset: int) -> zmq.Socket:
            s = self._ctx.socket(zmq.PUB)
            s.linger = 0
            security.arm_client(s, keys)
            s.sndhwm = 0  # never drop silently; the manager's queue bound answers with 305
            s.copy_threshold = COPY_THRESHOLD
            P.connect_managers(s, self.hosts, self.port + offset)
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
        P.connect_managers(self._sub, self.hosts, self.port + P.CLIENT_OUT)
        self._wake_r, self._wake_w = os.pipe()

    def _hello(self, path: str, to: str | None = None) -> None:
        header: dict[str, Any] = {"path": path}
        if to is not None:
            header["to"] = to
        if self._outbox.probe_name is not None and path == "infer":
            header["shm"] = self._outbox.probe_name  # read it, and you may read our segments
        self._send(path, P.HELLO, header)

    def _send(self, path: str, kind: str, header: dict, payload: list | tuple = ()) -> None:
        header.setdefault("cid", self.id)
        header.setdefault("pid", self.pid)
        frames = P.encode(P.TOPIC_MANAGER, kind, header, payload)
        if len(frames[1]) > self.max_header_size:  # the manager would drop it unread
            what = "param" if kind == P.REQUEST else f"the arguments of {header.get('cmd') or kind}"
            raise argument_error(what, f"they take {len(frames[1])} bytes, more than the manager's max_header_size of "
                                       f"{self.max_header_size}: send large data as a request's data, not in {what}")
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
        if not self.connected and len(self.hosts) > 1 and self.manager_id is not None:
            with self._link:  # a group between leaders: the next one is on its way
                self._link.wait_for(lambda: self.connected or self._closed, timeout=self.connect_timeout)
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
        with self._link:
            self._link.notify_all()  # a call waiting for a group's next leader ends now
        os.write(self._wake_w, b"x")
        self._io.join(timeout=5)
        self._waiting.fail_all(111, "this AICluster was released")
        self._callbacks.close()
        self._directs.close()
        for s in (*self._paths.values(), self._monitor, self._sub):
            s.close(linger=0)
        self._ctx.term()
        self._outbox.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- calls ------------------------------------------------------------------------

    def command(self, cmd: str, args: dict, on_done: Callable | None = None, on_progress: Callable | None = None) -> Pending:
        self.check_connected()
        p = Pending(next_request_no(), "cmd", time.monotonic() + ACK_TIMEOUT, on_done=on_done, on_progress=on_progress, cmd=cmd)
        self._waiting.add(p)
        try:
            self._send("mgmt", P.COMMAND, {"rid": p.rid, "cmd": cmd, "args": args})
        except BaseException:
            self._waiting.take(p.rid)
            raise
        return p

    def infer(self, inference: str, payload: Any, arr: dict | None, param: dict, on_done: Callable | None = None,
              result_only: bool = False, direct: DirectReply | None = None, detached: bool = False,
              priority: int = 0) -> Pending:
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
        if priority:
            header["pri"] = priority
        parent = current_traceparent()
        if parent is not None:
            header["tp"] = parent  # the manager's and the container's spans join the application's trace
        frames = self._outbox.frames(p, header, payload, detached)
        if len(self.hosts) > 1:  # a group: kept until accepted, to go to the next leader if need be
            p.unacked = (header, frames)
        self._waiting.add(p)
        try:
            self._send("infer", P.REQUEST, header, frames)
        except BaseException:
            self._waiting.take(p.rid)
            self._outbox.release(p)
            raise
        return p

    # ---- synchronous answers straight to the calling thread ----------------------------

    def direct_reply(self) -> DirectReply | None:
        """The calling thread's own answer socket, proven subscribed in this connection;
        None (answers come through the I/O thread) when it cannot be had."""
        return None if self._closed else self._directs.of_this_thread(self._generation)

    def wait_direct(self, p: Pending, d: DirectReply) -> Any:
        """``p.wait()`` for a request answered on ``d``, which this thread reads itself."""
        return self._directs.wait(p, d)

    def deliver(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the callback thread."""
        self._callbacks.deliver(fn, *args)

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
        if isinstance(h.get("maxh"), int) and h["maxh"] > 0:
            self.max_header_size = h["maxh"]
        self._takes_no_input(h)
        if h.get("path") == "infer":
            self._outbox.agreed(h.get("shm") is True)
        with self._link:
            self._refused = ""  # whatever refused us before, this path works now
            self._acked_paths.add(str(h.get("path")))
            if len(self._acked_paths) == 2 and not self.connected:
                recovered = self.manager_id is not None
                another = recovered and h.get("mid") != self.manager_id
                self.manager_id = h.get("mid")
                self.connected = True
                self._link.notify_all()
                if recovered:
                    self.logger.info("connection to the manager restored")
                    self._event(113, format_message(113), "keepalive", None)
                    if another:  # a new leader: the requests the lost one never acknowledged go to it
                        self._send_again()
            self._link.notify_all()

    def _on_heartbeat(self, msg: P.Message) -> None:
        mid = msg.header.get("mid")
        if self.connected and self.manager_id is not None and mid != self.manager_id:
            self._lost("the manager restarted")

    def _on_ack(self, msg: P.Message) -> None:
        self._waiting.acked(msg.header.get("rid"), msg.header)

    def _on_result(self, msg: P.Message) -> None:
        h = msg.header
        p = self._waiting.take(h.get("rid"))
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
        response = None if (code == 0 and p.result_only) else response_of(p, self.pid, h.get("resp"))
        if code == 305 and isinstance(h.get("retry_after"), (int, float)) and response is not None:
            response.metadata_sys["retry_after"] = h["retry_after"]
        self._waiting.finish(p, code, h.get("msg") or "", result, response, h.get("detail") or "")

    def _on_reply(self, msg: P.Message) -> None:
        h = msg.header
        p = self._waiting.take(h.get("rid"))
        if p is None:
            return
        code = int(h.get("code") or 0)
        result = P.unpack_value(msg.payload[0]) if (code == 0 and msg.payload) else None
        self._waiting.finish(p, code, h.get("msg") or "", result, detail=h.get("detail") or "")

    def _on_progress(self, msg: P.Message) -> None:
        p = self._waiting.get(msg.header.get("rid"))
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

    def _event(self, code: int, message: str, cmd: str, result: Any) -> None:
        if self.manage_callback is not None:
            self.deliver(self.manage_callback, code, message, cmd, result)

    def _timers(self) -> None:
        if self._closed:
            return
        now = time.monotonic()
        self._waiting.expire(now)
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

    def _send_again(self) -> None:
        """A group's new leader: the requests the lost one never acknowledged go to it (I/O
        thread). One the lost leader took and died before acknowledging (a window of
        microseconds) may so run twice."""
        for p in self._waiting.unacknowledged():
            header, frames = p.unacked  # type: ignore[misc]
            if "shm" in header and not self._outbox.shared and self._waiting.take(p.rid) is not None:
                self._waiting.fail(p, 402, "connection to the manager lost; its data was in shared memory the new "
                                           "leader cannot read (another host): send it again")
                continue
            header.pop("to", None)  # its thread's socket proves itself again: the answer comes through here
            p.deadline = time.monotonic() + ACK_TIMEOUT
            try:
                self._send("infer", P.REQUEST, header, frames)
            except Exception as exc:  # e.g. released meanwhile: it ends as a lost request
                self.logger.debug("request %s not sent again: %s", p.rid, exc)

    def _lost(self, why: str) -> None:
        self.logger.warning("connection to the manager lost: %s", why)
        with self._link:
            self.connected = False
            self._acked_paths.clear()
            self._outbox.agreed(False)  # the manager that comes back proves it again
            self._generation += 1  # threads' sockets prove themselves again
        # A group's requests that no manager accepted wait for the next leader (bounded by the
        # client's timeout); every other call ends now.
        keep = time.monotonic() + self.connect_timeout + ACK_TIMEOUT if len(self.hosts) > 1 else None
        self._waiting.fail_all(402, f"connection to the manager lost ({why})", keep)
        self._event(112, format_message(112), "keepalive", None)
        self._next_hello = 0.0


__all__ = ["ClusterClient"]
