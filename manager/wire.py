"""The manager's five sockets, and how it sends on them.

Applications and containers have listeners apart (docs/PROTOCOL.md, "Sockets"): the
inference and management ports and the results port on ``host``, the two container ports
on ``board_host``. Every socket is armed by the guard (CURVE, when on) and has
``ZMQ_MAXMSGSIZE``. Malformed messages the readers refuse are counted here, per port.

Router thread, all of it (the sockets are used by it alone).
"""
from __future__ import annotations

import logging
from typing import Any

import zmq

from infinibrain import protocol as P
from infinibrain.errors import format_message

from .auth import CLIENTS, CONTAINERS, Guard
from .config import ManagerConfig

log = logging.getLogger("infinibrain.manager.router")


class Wire:
    def __init__(self, config: ManagerConfig, guard: Guard, ctx: zmq.Context, instance: str) -> None:
        self.config = config
        self.guard = guard
        self.instance = instance  # this manager instance's id ("mid"), new at every start
        self.dropped_frames = 0
        self.dropped_by_port: dict[str, int] = {}
        base = config.port
        hosts = {CLIENTS: config.host, CONTAINERS: config.board_host or config.host}

        def sock(kind: int, offset: int, domain: str) -> zmq.Socket:
            s = ctx.socket(kind)
            s.linger = 0
            # A peer sending a larger frame is disconnected by ZeroMQ before we see it; the
            # SDK and the Connector check the limit first and answer with a numbered error.
            s.maxmsgsize = config.max_message_size
            guard.arm(s, domain)
            if kind == zmq.XPUB:
                # Every subscribe and unsubscribe reaches us: that is how containers are seen
                # to come and go. Heartbeats make a silent dead peer visible too.
                s.setsockopt(zmq.XPUB_VERBOSE, 1)
                s.setsockopt(zmq.XPUB_VERBOSER, 1)
                s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
                s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
            s.bind(f"tcp://{_bracketed(hosts[domain])}:{base + offset}")
            return s

        self.infer_in = sock(zmq.SUB, P.INFER_IN, CLIENTS)
        self.mgmt_in = sock(zmq.SUB, P.MGMT_IN, CLIENTS)
        self.container_in = sock(zmq.SUB, P.CONTAINER_IN, CONTAINERS)
        for s in (self.infer_in, self.mgmt_in, self.container_in):
            s.rcvhwm = 0  # flow is bounded by queues and credits, not by silent drops
            s.subscribe(b"")
        self.client_out = sock(zmq.PUB, P.CLIENT_OUT, CLIENTS)
        self.client_out.sndhwm = 100_000
        self.container_out = sock(zmq.XPUB, P.CONTAINER_OUT, CONTAINERS)
        self.container_out.sndhwm = 0
        self.port_names = {
            self.infer_in: "requests", self.mgmt_in: "management", self.client_out: "client-out",
            self.container_out: "container-out", self.container_in: "container-results",
        }

    def close(self) -> None:
        for s in self.port_names:
            s.close(linger=0)

    # ---- to clients ---------------------------------------------------------------------

    def to(self, topic: bytes, kind: str, header: dict, payload: list | tuple = ()) -> None:
        """Send to a client's topic, or to one of its threads' (protocol.reply_topic)."""
        P.send(self.client_out, P.encode(topic, kind, header, payload))

    def to_client(self, cid: str, kind: str, header: dict, payload: list | tuple = ()) -> None:
        self.to(P.client_topic(cid), kind, header, payload)

    def fail(self, topic: bytes, rid: str, code: int, *fields: Any, detail: str = "", **extra: Any) -> None:
        """End request ``rid``, whose answer goes to ``topic``, with a numbered error."""
        self.to(topic, P.RESULT, {"rid": rid, "code": code, "msg": format_message(code, *fields), "detail": detail, **extra})

    def event(self, header: dict, payload: list | tuple = ()) -> None:
        """To every client (topic ``ev``)."""
        self.to(P.TOPIC_EVENT, P.EVENT, header, payload)

    def announce(self, code: int, *fields: Any, info: dict | None = None, what: str = "unsubscribe", message: str = "",
                 detail: str = "") -> None:
        """An event for every client's manage callback: ``(code, message, what, info)``
        (114 with "unsubscribe", a restart with "restart"). ``message``: for code 0, which
        the reference gives no text; ``detail`` also goes in ``info["detail"]``."""
        info = dict(info or {}, detail=detail) if detail else (info or {})
        self.event({"code": code, "msg": message or format_message(code, *fields), "detail": detail, "what": what, "info": info})

    def beat(self) -> None:
        P.send(self.client_out, P.encode(P.TOPIC_HEARTBEAT, P.HEARTBEAT, {"mid": self.instance}))

    # ---- to containers ---------------------------------------------------------------------

    def to_container(self, wire_id: str, sub: str, kind: str, header: dict, payload: list | tuple = ()) -> None:
        P.send(self.container_out, P.encode(P.container_topic(wire_id, sub), kind, header, payload))

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
