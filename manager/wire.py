"""The manager's five sockets, and how it sends on them.

Applications and containers have listeners apart (docs/PROTOCOL.md, "Sockets"): the
inference and management ports and the results port on ``host``, the two container ports
on ``board_host``. Every socket is armed by the guard (CURVE, when on) and has
``ZMQ_MAXMSGSIZE``; the management port takes no frame larger than a header.

Every buffer has a bound. Inbound, each peer's pipe holds a few messages (``RCVHWM``; a
fast sender is slowed by TCP, never dropped). Outbound, the two publishing sockets are
XPUBs in manual mode: a subscription counts only once the router has checked who made it
(router.py), so a peer receives only what is meant for it; and each subscriber's pipe
holds at most ``CLIENT_HWM`` messages. What does not fit waits in that client's backlog,
in order, up to ``CLIENT_BACKLOG`` bytes (a burst of answers to a client busy sending,
say), sent as its pipe drains; beyond that the client does not read, and its messages are
dropped (counted per reason, logged once per client) instead of the manager holding them
without end. Malformed messages the readers refuse are counted here, per port.

Router thread, all of it (the sockets are used by it alone).
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any

import zmq

from infinibrain import protocol as P
from infinibrain.errors import format_message

from .auth import CLIENTS, CONTAINERS, Guard
from .config import ManagerConfig

log = logging.getLogger("infinibrain.manager.router")

# Messages a peer's inbound pipe holds before TCP slows the peer down: enough for the
# requests a client keeps in flight, few enough that a flood of large messages is bounded.
RCVHWM = {"requests": 16, "management": 16, "container-results": 256}
CLIENT_HWM = 64  # messages in one client's pipe; more wait in its backlog
CLIENT_BACKLOG = 16 * 1024 * 1024  # bytes of one client's backlog; beyond, it does not read: dropped
CONTAINER_HWM = 1024  # requests waiting for one container (credits bound them long before)


class Wire:
    def __init__(self, config: ManagerConfig, guard: Guard, ctx: zmq.Context, instance: str) -> None:
        self.curve = guard.enabled
        self.instance = instance  # this manager instance's id ("mid"), new at every start
        self.dropped_frames = 0
        self.dropped_by_port: dict[str, int] = {}
        self.dropped_sends: dict[str, int] = {}  # messages not sent, by reason (a client that does not read)
        self._slow_logged: set[str] = set()
        self._backlog: dict[bytes, deque[list]] = {}  # topic -> messages waiting for its client's pipe to drain
        self._backlog_bytes: dict[bytes, int] = {}
        base = config.port
        hosts = {CLIENTS: config.host, CONTAINERS: config.board_host or config.host}

        def sock(kind: int, offset: int, domain: str, hwm: int, max_frame: int) -> zmq.Socket:
            """A socket with every option set before it binds: a connection takes the
            options its listener had when it was bound (later ones would not apply)."""
            s = ctx.socket(kind)
            s.linger = 0
            # A peer sending a larger frame is disconnected by ZeroMQ before we see it; the
            # SDK and the Connector check the limit first and answer with a numbered error.
            s.maxmsgsize = max_frame
            guard.arm(s, domain)
            if kind == zmq.XPUB:
                # Every subscribe and unsubscribe reaches us, and counts only once the router
                # applies it: that is how containers are seen to come and go, and how no peer
                # gets another's messages. Heartbeats make a silent dead peer visible too.
                s.setsockopt(zmq.XPUB_VERBOSE, 1)
                s.setsockopt(zmq.XPUB_VERBOSER, 1)
                s.setsockopt(zmq.XPUB_MANUAL, 1)
                s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
                s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
                s.sndhwm = hwm
            else:
                s.rcvhwm = hwm
                s.subscribe(b"")
            s.bind(f"tcp://{_bracketed(hosts[domain])}:{base + offset}")
            return s

        biggest = config.max_message_size
        self.infer_in = sock(zmq.SUB, P.INFER_IN, CLIENTS, RCVHWM["requests"], biggest)
        # Commands carry no payload frames: none may be larger than a header.
        self.mgmt_in = sock(zmq.SUB, P.MGMT_IN, CLIENTS, RCVHWM["management"], config.max_header_size)
        self.container_in = sock(zmq.SUB, P.CONTAINER_IN, CONTAINERS, RCVHWM["container-results"], biggest)
        self.client_out = sock(zmq.XPUB, P.CLIENT_OUT, CLIENTS, CLIENT_HWM, biggest)
        self.client_out.setsockopt(zmq.XPUB_NODROP, 1)  # a full pipe is zmq.Again (counted), not a silent drop
        self.container_out = sock(zmq.XPUB, P.CONTAINER_OUT, CONTAINERS, CONTAINER_HWM, biggest)
        self.port_names = {
            self.infer_in: "requests", self.mgmt_in: "management", self.client_out: "client-out",
            self.container_out: "container-out", self.container_in: "container-results",
        }

    def close(self) -> None:
        for s in self.port_names:
            s.close(linger=0)

    # ---- to clients ---------------------------------------------------------------------

    def to(self, topic: bytes, kind: str, header: dict, payload: list | tuple = ()) -> None:
        """Send to a client's topic, or to one of its threads' (protocol.reply_topic); after
        what already waits for it, if anything does."""
        frames = P.encode(topic, kind, header, payload)
        if P.is_container_topic(topic):  # the answer of a container's call (calls.py)
            return P.send(self.container_out, frames)
        if topic in self._backlog and not self._flush(topic):
            return self._hold(topic, frames)
        try:
            P.send(self.client_out, frames, P.NOBLOCK)
        except zmq.Again:
            self._hold(topic, frames)

    def _hold(self, topic: bytes, frames: list) -> None:
        """Keep a message for a client whose pipe is full, unless its backlog is full too:
        then the client does not read, and the message is dropped and counted (its call
        ends by its own deadline in the SDK)."""
        size = sum(len(f) for f in frames)
        held = self._backlog_bytes.get(topic, 0)
        if held + size > CLIENT_BACKLOG:
            return self._not_read(topic)
        self._backlog.setdefault(topic, deque()).append(frames)
        self._backlog_bytes[topic] = held + size

    def _flush(self, topic: bytes) -> bool:
        """Send what waits for ``topic`` while its pipe takes it; whether nothing waits now."""
        waiting = self._backlog[topic]
        while waiting:
            try:
                P.send(self.client_out, waiting[0], P.NOBLOCK)
            except zmq.Again:
                return False
            self._backlog_bytes[topic] -= sum(len(f) for f in waiting.popleft())
        del self._backlog[topic], self._backlog_bytes[topic]
        return True

    def flush(self, now: float) -> None:
        """A timer pass: what waits for clients whose pipes have drained goes out."""
        for topic in list(self._backlog):
            self._flush(topic)

    def _not_read(self, topic: bytes) -> None:
        self.dropped_sends["client does not read"] = self.dropped_sends.get("client does not read", 0) + 1
        owner = P.topic_client(topic) or topic.decode(errors="replace")
        if owner not in self._slow_logged and len(self._slow_logged) < 1000:
            self._slow_logged.add(owner)
            log.warning("client %s does not read what the manager sends it (%d messages waiting): its messages are "
                        "dropped until it does", owner, CLIENT_HWM)

    def _broadcast(self, frames: list) -> None:
        """To every client: one that does not read misses it (its pipe is full), the others do not."""
        sock = self.client_out
        sock.setsockopt(zmq.XPUB_NODROP, 0)
        try:
            P.send(sock, frames)
        finally:
            sock.setsockopt(zmq.XPUB_NODROP, 1)

    def to_client(self, cid: str, kind: str, header: dict, payload: list | tuple = ()) -> None:
        self.to(P.client_topic(cid), kind, header, payload)

    def fail(self, topic: bytes, rid: str, code: int, *fields: Any, detail: str = "", **extra: Any) -> None:
        """End request ``rid``, whose answer goes to ``topic``, with a numbered error."""
        self.to(topic, P.RESULT, {"rid": rid, "code": code, "msg": format_message(code, *fields), "detail": detail, **extra})

    def event(self, header: dict, payload: list | tuple = ()) -> None:
        """To every client (topic ``ev``)."""
        self._broadcast(P.encode(P.TOPIC_EVENT, P.EVENT, header, payload))

    def announce(self, code: int, *fields: Any, info: dict | None = None, what: str = "unsubscribe", message: str = "",
                 detail: str = "") -> None:
        """An event for every client's manage callback: ``(code, message, what, info)``
        (114 with "unsubscribe", a restart with "restart"). ``message``: for code 0, which
        the reference gives no text; ``detail`` also goes in ``info["detail"]``."""
        info = dict(info or {}, detail=detail) if detail else (info or {})
        self.event({"code": code, "msg": message or format_message(code, *fields), "detail": detail, "what": what, "info": info})

    def beat(self) -> None:
        self._broadcast(P.encode(P.TOPIC_HEARTBEAT, P.HEARTBEAT, {"mid": self.instance}))

    # ---- to containers ---------------------------------------------------------------------

    def to_container(self, wire_id: str, sub: str, kind: str, header: dict, payload: list | tuple = ()) -> None:
        P.send(self.container_out, P.encode(P.container_topic(wire_id, sub), kind, header, payload))

    # ---- who sent a message ------------------------------------------------------------------------

    def user_of(self, frame: Any) -> str | None:
        """The key a received frame's connection proved (its Z85 text: ZAP's User-Id); ""
        without CURVE (nothing is proven, every peer is its claims); None for a message
        ZeroMQ made itself (the unsubscription of a connection that closed)."""
        if not self.curve:
            return ""
        try:
            return frame.get("User-Id")
        except zmq.ZMQError:
            return None

    # ---- what the readers refused ---------------------------------------------------------------

    def dropped(self, sock: zmq.Socket, why: Exception) -> None:
        """Count and log (rate-limited) a message that was dropped."""
        self.dropped_frames += 1
        port = self.port_names.get(sock, "?")
        self.dropped_by_port[port] = self.dropped_by_port.get(port, 0) + 1
        n = self.dropped_frames
        # The first ten, then one in ten thousand: a flood of garbage must not flood the log.
        if n <= 10 or n % 10_000 == 0:
            log.warning("dropped malformed message on the %s port (%d so far): %s: %s", port, n, type(why).__name__, why)


def _bracketed(address: str) -> str:
    """An address as a ZeroMQ tcp endpoint wants it (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address else address
