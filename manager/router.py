"""The router: what arrives on the manager's sockets, turned into the request path's calls.

Applications' messages (hello, heartbeat, request, command) arrive on the inference and
management ports, their subscriptions on the results port; containers' messages (hello,
heartbeat, results, calls to other inferences: calls.py) on the container results port, their subscriptions on the requests
port (that is how containers are seen to come and go). Requests and answers go to the
dispatcher (dispatch.py), commands to the command table (commands.py), what a
container's messages say about its health to ``Health`` (health.py). The router also
keeps clients' liveness and beats to them.

A message is believed for what its connection proved (with CURVE, the key ZAP gave each
message: ``Wire.user_of``), not for what it says: a client id belongs to the key that
first spoke for it (its messages and subscriptions from any other key are dropped and
counted); a container's messages and subscriptions count only from its own key
(auth.py: one key per container); a subscription counts only when it names exactly a
topic of its maker (a client's own results, a container's own requests, or the public
``hb`` and ``ev``), so nobody receives another's messages whatever it subscribes to,
and nobody can unsubscribe another. Headers are measured before they are decoded.
Without CURVE nothing is proven and a loopback manager trusts its host's users.

Router thread, all of it (its handlers and timers run in the ``Loop``).
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable

from infinibrain import protocol as P

from .auth import BY_HAND, MANAGE, Guard
from .calls import Calls
from .commands import Commands
from .config import ManagerConfig
from .dispatch import Dispatcher
from .health import Health
from .loop import Loop
from .payloads import Payloads
from .state import CALLER_PREFIX, Client, Clock, Instance
from .wire import Wire

log = logging.getLogger("infinibrain.manager.router")

PING_INTERVAL = 0.2  # a subscribed container that has not said hello is pinged this often
SILENT_CLIENT_CHECK = 0.5

Clients = dict[str, Client]  # every client the manager hears from, by its id
Strangers = Callable[[str, str], "Instance | None"]  # (wire id, module) -> the instance it now is


class Router:
    def __init__(self, config: ManagerConfig, loop: Loop, wire: Wire, guard: Guard, dispatcher: Dispatcher, health: Health,
                 payloads: Payloads, clients: Clients, commands: Commands, strangers: Strangers, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.wire = wire
        self.guard = guard
        self.max_header = config.max_header_size
        self.dispatcher = dispatcher
        self.health = health
        self.payloads = payloads
        self.clients = clients
        self.commands = commands
        self.strangers = strangers  # the reconciler's: a Connector started by hand, without a container identity
        self.calls = Calls(dispatcher, wire)
        self.hb_interval = config.heartbeat_interval_ms / 1000
        loop.reader(wire.infer_in, self._on_client_frames, wire.dropped)
        loop.reader(wire.mgmt_in, self._on_client_frames, wire.dropped)
        loop.reader(wire.container_in, self._on_container_frames, wire.dropped)
        loop.reader(wire.container_out, self._on_subscription, wire.dropped)
        loop.reader(wire.client_out, self._on_client_subscription, wire.dropped)
        loop.every(self._beat, self.hb_interval)
        loop.every(self._ping_silent)
        loop.every(self._forget_silent_clients, SILENT_CLIENT_CHECK)
        loop.every(wire.flush)
        log.info("router %s serving applications on %s:%d-%d, containers on %s:%d-%d", wire.instance, config.host,
                 config.port, config.port + P.CLIENT_OUT, config.board_host, config.port + P.CONTAINER_OUT,
                 config.port + P.CONTAINER_IN)

    # ---- clients -------------------------------------------------------------------------

    def _client(self, cid: str, user: str | None) -> Client:
        """Client ``cid`` as the key ``user`` speaks for it: made on first sight and bound
        to that key; ProtocolError when another key owns it, or the key is not allowed."""
        client = self.clients.get(cid)
        if client is None:
            if cid.startswith(CALLER_PREFIX):
                raise P.ProtocolError(f"client id {cid!r}: ids starting {CALLER_PREFIX!r} are containers' (calls.py)")
            role = MANAGE if user == "" else self.guard.role_of(user or "")
            if role is None:
                raise P.ProtocolError("a message of a key that is no longer allowed")
            client = self.clients[cid] = Client(cid, 0, self.clock(), user=user or "", role=role)
        elif client.user != user:
            raise P.ProtocolError(f"client id {cid!r} belongs to another key")
        return client

    def _on_client_frames(self, frames: list) -> None:
        msg = P.decode(frames, self.max_header)
        h = msg.header
        cid = h.get("cid")
        if not isinstance(cid, str) or not cid:
            raise P.ProtocolError("client message without client id")
        client = self._client(cid, self.wire.user_of(frames[1]))
        client.pid = client.pid or int(h.get("pid") or 0)
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
                          "max": self.config.max_message_size, "maxh": self.max_header, "no_input": self.dispatcher.no_input,
                          "shm": shm_ok, "role": client.role})
        else:
            raise P.ProtocolError(f"unknown client message kind {kind!r}")

    def _beat(self, now: float) -> None:
        self.wire.beat()

    def _forget_silent_clients(self, now: float) -> None:
        limit = self.config.client_timeout_ms / 1000
        gone = {cid for cid, cl in self.clients.items() if now - cl.last_seen > limit}
        if not gone:
            return
        for cid in gone:
            del self.clients[cid]
            self.payloads.forget(cid)
        dropped = self.dispatcher.take_waiting(lambda r: r.client in gone)  # one pass over the queues: nobody is left to answer
        for cid, count in collections.Counter(r.client for r in dropped).items():
            log.info("dropped %d queued requests of silent client %s", count, cid)

    def _on_client_subscription(self, frames: list) -> None:
        """A client subscribes to its own topics and the public ones, nothing else."""
        on, topic = _subscription(frames[0])
        user = self.wire.user_of(frames[0])
        if user is None:
            return  # ZeroMQ's own: a connection closed and its subscriptions went with it
        if topic not in (P.TOPIC_HEARTBEAT, P.TOPIC_EVENT):
            cid = P.topic_client(topic)
            if cid is None:
                raise P.ProtocolError(f"subscription to {bytes(topic[:64])!r}, which is no client's own topic")
            self._client(cid, user)
        if on:
            self.wire.client_out.subscribe(topic)  # for the connection that asked (XPUB_MANUAL)
        else:
            self.wire.client_out.unsubscribe(topic)

    # ---- containers ----------------------------------------------------------------------

    def _speaks_for(self, user: str | None, c: Instance) -> bool:
        """Whether a message of key ``user`` may speak for container ``c``: its own key, or
        a hand-run program's key for an ``other`` container (and anything without CURVE)."""
        if user == "":
            return True
        owner = self.guard.owner_of(user or "")
        return owner == c.id or (owner == BY_HAND and (c.runtime.kind == "other" or c.id.startswith(P.ANONYMOUS)))

    def _on_subscription(self, frames: list) -> None:
        on, topic = _subscription(frames[0])
        parsed = P.parse_container_topic(topic)
        if parsed is None:
            raise P.ProtocolError(f"subscription to a topic no container uses: {bytes(topic[:64])!r}")
        cid, sub = parsed
        user = self.wire.user_of(frames[0])
        c = self.dispatcher.containers.get(cid)
        if user is None:  # ZeroMQ's own: the connection that held this subscription closed
            if c is not None and not on:
                self._unsubscribed(c, sub)
            return
        if c is None and on and cid.startswith(P.ANONYMOUS) and (user == "" or self.guard.owner_of(user) == BY_HAND):
            c = self.strangers(cid, sub)
        if c is None:
            log.debug("subscription from unknown container %r", cid)
            return
        if not self._speaks_for(user, c):
            raise P.ProtocolError(f"a subscription for container {cid!r} made with another key")
        if on:
            self.wire.container_out.subscribe(topic)  # for the connection that asked (XPUB_MANUAL)
            c.subs.add(sub)
            if not c.hello:
                self._ping(c)
            elif c.connected:
                self.dispatcher.pump(c.inference)
        else:
            self.wire.container_out.unsubscribe(topic)
            self._unsubscribed(c, sub)

    def _unsubscribed(self, c: Instance, sub: str) -> None:
        if c.subs == {sub}:  # its last subscription: the container is gone
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
        msg = P.decode(frames, self.max_header)
        h = msg.header
        c = self.dispatcher.containers.get(str(h.get("cont")))
        if c is None:
            log.debug("message from unknown container %r", h.get("cont"))
            return
        if not self._speaks_for(self.wire.user_of(frames[1]), c):
            raise P.ProtocolError(f"a message for container {c.id!r} sent with another key")
        kind = msg.kind
        if kind not in (P.RESULT, P.RESULTS, P.TAKEN, P.HEARTBEAT, P.HELLO, P.CALL):
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
        elif kind == P.CALL:  # a request of its own to another inference (calls.py)
            self.calls.call(c, msg, self.clock())
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


def _subscription(frame: Any) -> tuple[bool, bytes]:
    """(subscribe?, topic) of a subscription message an XPUB socket received."""
    data = frame.bytes
    if not data or data[0] not in (0, 1):
        raise P.ProtocolError("not a subscription message")
    return data[0] == 1, data[1:]
