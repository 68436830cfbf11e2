"""The router: what arrives on the manager's sockets, turned into the request path's calls.

Applications' messages (hello, heartbeat, request, command) arrive on the inference and
management ports; containers' (hello, heartbeat, results) on the results port, and their
subscriptions on the requests port (an XPUB socket: that is how containers are seen to
come and go). Requests and answers go to the dispatcher (dispatch.py), commands to the
command table (commands.py), what a container's messages say about its health to
``Health`` (health.py). The router also keeps clients' liveness and beats to them.

Router thread, all of it (its handlers and timers run in the ``Loop``).
"""
from __future__ import annotations

import logging
from typing import Callable

from infinibrain import protocol as P

from .commands import Commands
from .config import ManagerConfig
from .dispatch import Dispatcher
from .health import Health
from .loop import Loop
from .payloads import Payloads
from .state import Client, Clock, Instance
from .wire import Wire

log = logging.getLogger("infinibrain.manager.router")

PING_INTERVAL = 0.2  # a subscribed container that has not said hello is pinged this often
SILENT_CLIENT_CHECK = 0.5

Clients = dict[str, Client]  # every client the manager hears from, by its id
Strangers = Callable[[str, str], "Instance | None"]  # (wire id, module) -> the instance it now is


class Router:
    def __init__(self, config: ManagerConfig, loop: Loop, wire: Wire, dispatcher: Dispatcher, health: Health,
                 payloads: Payloads, clients: Clients, commands: Commands, strangers: Strangers, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.wire = wire
        self.dispatcher = dispatcher
        self.health = health
        self.payloads = payloads
        self.clients = clients
        self.commands = commands
        self.strangers = strangers  # the reconciler's: a Connector started by hand, without a container identity
        self.hb_interval = config.heartbeat_interval_ms / 1000
        self._next_beat = 0.0
        self._next_client_check = 0.0
        loop.reader(wire.infer_in, self._on_client_frames, wire.dropped)
        loop.reader(wire.mgmt_in, self._on_client_frames, wire.dropped)
        loop.reader(wire.container_in, self._on_container_frames, wire.dropped)
        loop.reader(wire.container_out, self._on_subscription, wire.dropped)
        for timer in (self._beat, self._ping_silent, self._forget_silent_clients):
            loop.every(timer)
        log.info("router %s serving applications on %s:%d-%d, containers on %s:%d-%d", wire.instance, config.host,
                 config.port, config.port + P.CLIENT_OUT, config.board_host, config.port + P.CONTAINER_OUT,
                 config.port + P.CONTAINER_IN)

    # ---- clients -------------------------------------------------------------------------

    def _on_client_frames(self, frames: list) -> None:
        msg = P.decode(frames)
        h = msg.header
        cid = h.get("cid")
        if not isinstance(cid, str) or not cid:
            raise P.ProtocolError("client message without client id")
        client = self.clients.get(cid)
        if client is None:
            client = self.clients[cid] = Client(cid, int(h.get("pid") or 0), self.clock())
        client.last_seen = self.clock()
        kind = msg.kind
        if kind == P.REQUEST:
            self.dispatcher.accept(client, msg)
        elif kind == P.HEARTBEAT:
            pass
        elif kind == P.COMMAND:
            self.wire.to_client(cid, P.ACK, {"rid": h["rid"]})
            self.commands.submit(client, str(h["rid"]), str(h["cmd"]), h.get("args") or {})
        elif kind == P.HELLO:  # with "to": a thread's own socket proves it is subscribed
            shm_ok = self.payloads.hello(client, h["shm"]) if "shm" in h else client.shm is True
            self.wire.to(P.reply_topic(cid, h.get("to")), P.HELLO_ACK,
                         {"path": h.get("path"), "mid": self.wire.instance, "hb": self.hb_interval,
                          "max": self.config.max_message_size, "no_input": self.dispatcher.no_input, "shm": shm_ok})
        else:
            raise P.ProtocolError(f"unknown client message kind {kind!r}")

    def _beat(self, now: float) -> None:
        if now >= self._next_beat:
            self._next_beat = now + self.hb_interval
            self.wire.beat()

    def _forget_silent_clients(self, now: float) -> None:
        if now < self._next_client_check:
            return
        self._next_client_check = now + SILENT_CLIENT_CHECK
        limit = self.config.client_timeout_ms / 1000
        for cid in [cid for cid, cl in self.clients.items() if now - cl.last_seen > limit]:
            del self.clients[cid]
            self.payloads.forget(cid)
            dropped = self.dispatcher.take_waiting(lambda r: r.client == cid)  # nobody is left to answer
            if dropped:
                log.info("dropped %d queued requests of silent client %s", len(dropped), cid)

    # ---- containers ----------------------------------------------------------------------

    def _on_subscription(self, frames: list) -> None:
        data = frames[0].bytes
        if not data or data[0] not in (0, 1):
            raise P.ProtocolError("not a subscription message")
        parsed = P.parse_container_topic(data[1:])
        if parsed is None:
            raise P.ProtocolError(f"subscription to a topic no container uses: {bytes(data[1:65])!r}")
        cid, sub = parsed
        c = self.dispatcher.containers.get(cid)
        if c is None and data[0] == 1 and cid.startswith(P.ANONYMOUS):
            c = self.strangers(cid, sub)
        if c is None:
            log.debug("subscription from unknown container %r", cid)
            return
        if data[0] == 1:
            c.subs.add(sub)
            if not c.hello:
                self._ping(c)
            elif c.connected:
                self.dispatcher.pump(c.inference)
        elif c.subs == {sub}:  # its last subscription: the container is gone
            self.dispatcher.container_lost(c, "its connection closed")
        else:
            c.subs.discard(sub)

    def _ping(self, c: Instance) -> None:
        c.last_ping = self.clock()
        for sub in c.subs:
            self.wire.to_container(c.id, sub, P.PING, {"mid": self.wire.instance})

    def _ping_silent(self, now: float) -> None:
        for c in self.dispatcher.containers.values():
            if c.subs and not c.hello and now - c.last_ping >= PING_INTERVAL:
                self._ping(c)

    def _on_container_frames(self, frames: list) -> None:
        msg = P.decode(frames)
        h = msg.header
        c = self.dispatcher.containers.get(str(h.get("cont")))
        if c is None:
            log.debug("message from unknown container %r", h.get("cont"))
            return
        kind = msg.kind
        if kind not in (P.RESULT, P.RESULTS, P.TAKEN, P.HEARTBEAT, P.HELLO):
            raise P.ProtocolError(f"unknown container message kind {kind!r}")
        routable = self.health.heard(c, self.clock(), kind == P.HEARTBEAT)
        # Any message proves its response path (a producer that never receives answers no
        # ping, but its results arrive); a hello says so in as many words.
        if kind == P.HELLO or not c.hello:
            c.heartbeats = c.heartbeats or bool(h.get("hb"))
            if kind == P.HELLO and isinstance(h.get("batch"), int) and h["batch"] > 1:
                c.batch[str(h.get("sub"))] = h["batch"]  # its Connector asks for batches
            if kind == P.HELLO:
                c.shm = self.payloads.container_reads(h.get("shm"))
            if not c.hello:
                c.hello = True
                log.info("container %s connected", c.id)
            if c.connected:
                self.health.connected(c)
                routable = True
        if kind in (P.RESULT, P.TAKEN):
            if h.get("mkey") is None:
                self.dispatcher.produced(c, msg)
            else:
                routable = self.dispatcher.answered(c, h, msg.payload[0] if msg.payload else None, taken=kind == P.TAKEN) or routable
        elif kind == P.RESULTS:
            routable = self._on_answers(c, msg) or routable
        if routable:
            self.dispatcher.pump(c.inference)

    def _on_answers(self, c: Instance, msg: P.Message) -> bool:
        """Results of several requests in one message: each goes to its own caller."""
        items = msg.header.get("items")
        if not isinstance(items, list) or len(items) != len(msg.payload):
            raise P.ProtocolError(f"a batch of results needs one frame per item ({len(msg.payload)} frames)")
        routable = False
        for item, frame in zip(items, msg.payload):
            if isinstance(item, dict) and item.get("mkey") is not None:
                routable = self.dispatcher.answered(c, item, frame) or routable
        return routable
