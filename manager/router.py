"""The router: one poll loop that owns every socket and every piece of routing state.

It accepts requests from clients, keeps them in per-inference send-wait queues, hands them
to containers that are connected, distributing and have credit (``max_send_num``), and
forwards answers back. Every request ends in a result or a numbered error: 305 at once when
the queue is full, 306 when it waited too long to be sent, 401 when its answer is late,
402 when its container went away.

Each inference is a ``Service`` (as in the ZeroMQ guide's Majordomo broker): its settings,
its send-wait queue and its instances, so picking a container looks at that inference's
instances only, however many others are registered. Only READY instances receive
requests; what an instance's life is (starting, ready, unhealthy, stopping) is the
reconciler's business (manager/reconciler.py), told what the wire shows through the
``Lifecycle`` hooks below.

Slow management work (deploying, stopping, copying files) runs on worker threads that
reach this state only through ``call`` / ``call_soon``, so the loop never waits on it. The
loop never dies: an exception in a handler, a timer, a hook or a cross-thread call is
logged, counted (``stats``, ``infinibrain_loop_errors_total``) and the loop goes on.
"""
from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import logging
import math
import os
import queue
import random
import time
import uuid
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Callable, Protocol

import zmq

from infinibrain import allocator
from infinibrain import protocol as P
from infinibrain import shm
from infinibrain.errors import format_message

from .auth import CLIENTS, CONTAINERS, Guard
from .config import ManagerConfig
from .metrics import NullMetrics
from .registry import Registration
from .state import Client, Instance, Request, State
from .validate import default_sub_name, module_list

if TYPE_CHECKING:
    from .commands import Commands

log = logging.getLogger(__name__)

BATCH = 256  # messages taken from one socket per pass, so no socket starves the others
TICK = 0.05  # seconds between timer passes
PING_INTERVAL = 0.2
# A request answered sooner needs no acknowledgement: its result says it was accepted. One
# that takes longer is acknowledged (with its deadline) by the next timer pass after this.
ACK_DELAY = 0.1
SILENT_CLIENT_CHECK = 0.5


class Lifecycle(Protocol):
    """What the router tells the reconciler about instances (router thread)."""

    def connected(self, inst: Instance) -> None:
        """Its Connector's response path is proven (it said hello)."""

    def heard(self, inst: Instance, beat: bool) -> None:
        """An UNHEALTHY instance sent something (``beat``: an idle heartbeat)."""

    def overdue(self, inst: Instance, req: Request) -> None:
        """A request it held passed its answer deadline (it was ended with 401)."""

    def warmed(self, inst: Instance, code: int, message: str) -> None:
        """Its warm-up request was answered (0) or failed (a numbered error)."""

    def tick(self, now: float) -> None:
        """The timer pass: look at what runs."""

    def stranger(self, wire_id: str, sub: str) -> Instance | None:
        """A Connector without a container identity (started by hand with explicit
        arguments) subscribed for module ``sub``: the instance it now is, if any."""


class _NoLifecycle:
    def connected(self, inst: Instance) -> None:
        pass

    def heard(self, inst: Instance, beat: bool) -> None:
        pass

    def overdue(self, inst: Instance, req: Request) -> None:
        pass

    def warmed(self, inst: Instance, code: int, message: str) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def stranger(self, wire_id: str, sub: str) -> Instance | None:
        return None


class Service:
    """One registered inference as the router routes it: settings, queue, instances."""

    def __init__(self, reg: Registration) -> None:
        self.queue: deque[Request] = deque()
        self.instances: dict[str, Instance] = {}
        self.update(reg)

    def update(self, reg: Registration) -> None:
        """New settings (a change of the registration); the queue and instances stay."""
        self.reg = reg
        cfg = reg.config
        self.name = reg.name
        self.takes_input = cfg["input"] is not None
        self.replies = cfg["output"] is not None
        self.modules = [m["sub_inference_name"] for m in module_list(cfg)] or [reg.name]
        self.default_sub = default_sub_name(cfg)
        # Dynamic batching (opt-in): up to max_batch_size requests per message to an
        # instance whose Connector asks for batches, holding a short batch for up to
        # max_queue_delay ms while more may come.
        self.max_batch = cfg.get("max_batch_size") or 1
        self.batch_delay = (cfg.get("max_queue_delay") or 0) / 1000
        self.batch_timer = 0.0  # when a pump is due for a batch held back (0: none)

    def limit(self, default: int) -> int:
        return self.reg.config["max_send_num"] or default

    def batch_size(self, c: Instance, sub: str) -> int:
        """Requests per message to ``c`` for module ``sub``: 1 unless both the inference
        and the instance's Connector batch."""
        return min(self.max_batch, c.batch.get(sub, 1))

    def routable(self, c: Instance) -> bool:
        placement = self.reg.boards.get(c.board)
        return c.serving and placement is not None and placement.distribution == "on"


class Router:
    def __init__(self, config: ManagerConfig, ctx: zmq.Context | None = None, guard: Guard | None = None) -> None:
        self.config = config
        self.instance = uuid.uuid4().hex[:12]
        self.ctx = ctx or zmq.Context.instance()
        self.guard = guard or Guard(config, self.ctx)
        self.services: dict[str, Service] = {}
        self.containers: dict[str, Instance] = {}  # every instance, by its wire id
        self.clients: dict[str, Client] = {}
        self.commands: Commands | None = None  # set by the daemon
        self.lifecycle: Lifecycle = _NoLifecycle()  # set by the daemon (manager.reconciler.Reconciler)
        self.metrics: NullMetrics = NullMetrics()  # set by the daemon when metrics are on (manager.metrics.Metrics)
        self.dropped_frames = 0
        self.dropped_by_port: dict[str, int] = {}
        self.loop_errors: Counter[str] = Counter()
        self._no_input: list[str] = []  # inferences registered with input=None (clients are told)
        # Another manager instance (before a restart) numbered its requests from elsewhere,
        # so a late answer to one of its requests can never be taken for one of ours.
        self._mkeys = itertools.count(random.getrandbits(40) << 12)
        self._later: list[tuple[float, int, Callable, tuple]] = []
        self._later_seq = itertools.count()
        self._rr = itertools.count()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = False
        self._next_tick = 0.0
        self._next_beat = 0.0
        self._next_client_check = 0.0
        self.hb_interval = config.heartbeat_interval_ms / 1000
        allocator.tune()  # message buffers reused, not mapped anew each time (infinibrain/allocator.py)
        self._shm = shm.Reader()  # clients' segments, read for containers that cannot
        self.shm_passed = 0  # requests whose data a container read from shared memory itself
        self.shm_read = 0  # requests whose data the manager read from shared memory for a container
        self.shm_token = f"{os.getpid()}:{self.instance}"  # what a container finds in our probe (its pid: for shm.sweep)
        self._shm_probe = self._probe()
        self._bind()

    def _probe(self) -> shm.Probe | None:
        """The segment a container reads to show it shares our /dev/shm (it is named in
        every container's INFINIBRAIN_SHM_PROBE, manager/boards.py)."""
        if not shm.available():
            return None
        try:
            return shm.Probe(shm.manager_probe_name(self.config.port), self.shm_token)
        except OSError as exc:
            log.info("no shared memory probe for containers (%s): requests' data reach them in frames", exc)
            return None

    # ---- sockets -------------------------------------------------------------------

    def _bind(self) -> None:
        base = self.config.port
        # Applications and containers each have their own listeners: the boards' network
        # sees the container ports only.
        hosts = {CLIENTS: self.config.host, CONTAINERS: self.config.board_host or self.config.host}

        def sock(kind: int, offset: int, domain: str) -> zmq.Socket:
            s = self.ctx.socket(kind)
            s.linger = 0
            # A peer sending a larger frame is disconnected by ZeroMQ before we see it; the
            # SDK and the Connector check the limit first and answer with a numbered error.
            s.maxmsgsize = self.config.max_message_size
            self.guard.arm(s, domain)
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
        for s in (self.infer_in, self.mgmt_in, self.container_in, self.client_out, self.container_out):
            s.close(linger=0)
        self.guard.close()
        if self._shm_probe is not None:
            self._shm_probe.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def live_figures(self) -> dict:
        """Router thread: what the metrics' gauges show (manager/metrics.py)."""
        return {
            "queues": {n: len(svc.queue) for n, svc in self.services.items()},
            "containers": [
                {"id": c.id, "suffix": c.suffix, "inference": c.inference, "board": c.board, "in_flight": len(c.in_flight),
                 "connected": c.connected, "state": c.state.value, "revision": c.revision, "tx_bytes": c.tx_bytes,
                 "rx_bytes": c.rx_bytes}
                for c in self.containers.values()
            ],
            "dropped_by_port": dict(self.dropped_by_port),
            "refused_keys": self.guard.denied(),
            "clients": len(self.clients),
            "loop_errors": dict(self.loop_errors),
        }

    def stats(self) -> dict:
        """What the manager has dropped and holds (the ``stats`` command): the metrics'
        figures, the non-zero ones only, plus its memory."""
        live = self.live_figures()
        return {
            "instance": self.instance,
            "dropped_frames": self.dropped_frames,
            "dropped_by_port": live["dropped_by_port"],
            "refused_keys": live["refused_keys"],
            "clients": live["clients"],
            "queued": {n: depth for n, depth in live["queues"].items() if depth},
            "in_flight": {c["id"]: c["in_flight"] for c in live["containers"] if c["in_flight"]},
            "loop_errors": live["loop_errors"],
            "max_message_size": self.config.max_message_size,
            "shared_memory": {"passed": self.shm_passed, "read": self.shm_read},
            "rss_bytes": _rss_bytes(),
        }

    # ---- services and instances (the reconciler's door) -----------------------------------

    def open_service(self, reg: Registration) -> None:
        """Route requests for ``reg`` (new, or new settings of a registered inference)."""
        svc = self.services.get(reg.name)
        if svc is None:
            svc = self.services[reg.name] = Service(reg)
            for c in self.containers.values():
                if c.inference == reg.name:
                    svc.instances[c.id] = c
        else:
            svc.update(reg)
        self._tell_inputs()
        self.pump(reg.name)

    def close_service(self, name: str, why: str) -> None:
        """Stop routing ``name``: its waiting requests end with 400."""
        svc = self.services.pop(name, None)
        if svc is None:
            return
        self._tell_inputs()
        while svc.queue:
            self.end(svc.queue.popleft(), 400, detail=f"inference {name!r} {why} while the request waited")

    def _tell_inputs(self) -> None:
        """Clients refuse requests for inferences that take none (input=None, 403) at call
        time: they learn the list in the hello_ack, and here whenever it changes."""
        names = sorted(n for n, svc in self.services.items() if not svc.takes_input)
        if names != self._no_input:
            self._no_input = names
            P.send(self.client_out, P.encode(P.TOPIC_EVENT, P.EVENT, {"what": "inputs", "no_input": names}))

    def add_instance(self, c: Instance) -> None:
        self.containers[c.id] = c
        svc = self.services.get(c.inference)
        if svc is not None:
            svc.instances[c.id] = c

    def rekey(self, c: Instance, wire_id: str) -> None:
        """Instance ``c`` is reached as ``wire_id`` from now on (an ``other`` container's
        program started by hand, whose Connector named itself)."""
        old = c.id
        self.container_lost(c, "another program took its place", announce=False)
        self.containers.pop(old, None)
        c.id = wire_id
        self.containers[wire_id] = c
        svc = self.services.get(c.inference)
        if svc is not None:
            svc.instances.pop(old, None)
            svc.instances[wire_id] = c

    def remove_instance(self, c: Instance) -> None:
        self.container_lost(c, "it was removed", announce=False)
        if self.containers.get(c.id) is c:
            del self.containers[c.id]
        svc = self.services.get(c.inference)
        if svc is not None and svc.instances.get(c.id) is c:
            del svc.instances[c.id]

    # ---- cross-thread entry points -----------------------------------------------

    def call_soon(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the router thread (from any thread)."""
        self._calls.put((fn, args, None))
        self._wake()

    def call(self, fn: Callable, *args: Any, timeout: float = 30.0) -> Any:
        """Run ``fn(*args)`` on the router thread and return its result (from a worker)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, args, fut))
        self._wake()
        return fut.result(timeout)

    def call_later(self, delay: float, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the router thread after ``delay`` seconds (router thread only)."""
        heapq.heappush(self._later, (time.monotonic() + delay, next(self._later_seq), fn, args))

    def stop(self) -> None:
        self._stop = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is awake anyway

    def _run_calls(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                fn, args, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn(*args)
            except BaseException as exc:  # handed back to the worker, or logged and counted
                if fut is None:
                    self._failed("call " + getattr(fn, "__name__", type(fn).__name__))
                else:
                    fut.set_exception(exc)
            else:
                if fut is not None:
                    fut.set_result(result)

    def _failed(self, where: str) -> None:
        """An exception where the loop must go on: logged with its traceback, counted."""
        self.loop_errors[where.split()[0]] += 1
        log.exception("router: %s failed; the router goes on", where)

    # ---- the loop ----------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        handlers = {
            self.infer_in: self._on_client_frames,
            self.mgmt_in: self._on_client_frames,
            self.container_in: self._on_container_frames,
            self.container_out: self._on_subscription,
        }
        for s in handlers:
            poller.register(s, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        log.info("router %s serving applications on %s:%d-%d, containers on %s:%d-%d", self.instance, self.config.host,
                 self.config.port, self.config.port + P.CLIENT_OUT, self.config.board_host, self.config.port + P.CONTAINER_OUT,
                 self.config.port + P.CONTAINER_IN)
        while not self._stop:
            try:
                due = min(self._next_tick, self._later[0][0]) if self._later else self._next_tick
                timeout = max(0.0, due - time.monotonic())
                for sock, _ in poller.poll(math.ceil(timeout * 1000)):
                    if sock == self._wake_r:
                        self._run_calls()
                    else:
                        self._drain(sock, handlers[sock])
                now = time.monotonic()
                if now >= self._next_tick:
                    self._timers()
                elif self._later and self._later[0][0] <= now:  # between ticks: a held batch's delay
                    self._run_later(now)
            except zmq.ContextTerminated:
                return
            except Exception:  # never reached by the guarded parts below; the last line of defence
                self._failed("loop")
                time.sleep(0.01)  # a fault that repeats must not spin a core

    def _drain(self, sock: zmq.Socket, handler: Callable[[list], None]) -> None:
        for frames in P.received(sock, BATCH, polled=True):
            try:
                handler(frames)
            except P.ProtocolError as exc:
                self._dropped(sock, exc)
            except Exception as exc:  # one bad message must never stop the loop
                self._dropped(sock, exc)
                log.debug("handler failure", exc_info=True)

    def _dropped(self, sock: zmq.Socket, why: Exception) -> None:
        """Count and log (rate-limited) a message that was dropped."""
        self.dropped_frames += 1
        port = self.port_names.get(sock, "?")
        self.dropped_by_port[port] = self.dropped_by_port.get(port, 0) + 1
        n = self.dropped_frames
        # The first ten, then one in ten thousand: a flood of garbage must not flood the log.
        if n <= 10 or n % 10_000 == 0:
            log.warning("dropped malformed message on the %s port (%d so far): %s: %s", port, n, type(why).__name__, why)

    # ---- clients -------------------------------------------------------------------

    def _on_client_frames(self, frames: list) -> None:
        msg = P.decode(frames)
        h = msg.header
        cid = h.get("cid")
        if not isinstance(cid, str) or not cid:
            raise P.ProtocolError("client message without client id")
        client = self.clients.get(cid)
        if client is None:
            client = self.clients[cid] = Client(cid, int(h.get("pid") or 0), time.monotonic())
        client.last_seen = time.monotonic()
        kind = msg.kind
        if kind == P.REQUEST:
            self._on_request(client, msg)
        elif kind == P.HEARTBEAT:
            pass
        elif kind == P.COMMAND:
            self.send_client(cid, P.ACK, {"rid": h["rid"]})
            assert self.commands is not None, "the daemon sets the command table before the loop runs"
            self.commands.submit(client, str(h["rid"]), str(h["cmd"]), h.get("args") or {})
        elif kind == P.HELLO:  # with "to": a thread's own socket proves it is subscribed
            if "shm" in h and not client.shm:  # may it name its shared memory? only if we read its probe
                client.shm = h["shm"] == shm.probe_name(cid) and shm.proven(cid)
            self.send_to(P.reply_topic(cid, h.get("to")), P.HELLO_ACK,
                         {"path": h.get("path"), "mid": self.instance, "hb": self.hb_interval,
                          "max": self.config.max_message_size, "no_input": self._no_input, "shm": client.shm is True})
        else:
            raise P.ProtocolError(f"unknown client message kind {kind!r}")

    def send_client(self, cid: str, kind: str, header: dict, payload: list | tuple = ()) -> None:
        self.send_to(P.client_topic(cid), kind, header, payload)

    def send_to(self, topic: bytes, kind: str, header: dict, payload: list | tuple = ()) -> None:
        """Send to a client's topic, or to one of its threads' (protocol.reply_topic)."""
        P.send(self.client_out, P.encode(topic, kind, header, payload))

    def fail(self, topic: bytes, rid: str, code: int, *fields: Any, detail: str = "") -> None:
        """End request ``rid``, whose answer goes to ``topic``, with a numbered error."""
        self.send_to(topic, P.RESULT, {"rid": rid, "code": code, "msg": format_message(code, *fields), "detail": detail})

    def end(self, req: Request, code: int, detail: str) -> None:
        """End accepted request ``req`` with a numbered error (and count it)."""
        if not req.client:  # the manager's own (a warm-up): its instance hears of it
            c = self.containers.get(req.container or "")
            if c is not None:
                self.lifecycle.warmed(c, code, detail or format_message(code))
            return
        self.fail(req.reply, req.rid, code, detail=detail)
        self.metrics.ended(req, code)

    def _refuse(self, reply: bytes, rid: str, name: Any, code: int, *fields: Any, detail: str = "") -> None:
        """Refuse a request before accepting it (and count it)."""
        self.fail(reply, rid, code, *fields, detail=detail)
        self.metrics.refused(name if isinstance(name, str) and name in self.services else "", code)

    def _on_request(self, client: Client, msg: P.Message) -> None:
        h = msg.header
        rid, name = str(h["rid"]), h.get("inf")
        reply = P.reply_topic(client.id, h.get("to"))
        svc = self.services.get(name) if isinstance(name, str) else None
        if svc is None or not isinstance(name, str):
            return self._refuse(reply, rid, name, 400, detail=f"inference {name!r} is not registered")
        if not svc.takes_input:
            return self._refuse(reply, rid, name, 403, name)
        param = h.get("param")
        sub = param.get("sub_inference_name") if isinstance(param, dict) else None
        if sub and sub not in svc.modules:
            return self._refuse(reply, rid, name, 400, detail=f"inference {name!r} has no module {sub!r} (it has {', '.join(svc.modules)})")
        waiting = svc.queue
        if len(waiting) >= self.config.send_queue_size:
            return self._refuse(reply, rid, name, 305, detail=f"{len(waiting)} requests wait for {name!r}")
        now = time.monotonic()
        cfg = svc.reg.config
        send_timeout = (cfg["send_timeout"] or self.config.default_send_timeout_ms) / 1000
        # 0 in the manager's configuration: no limit on the answer (a container that goes
        # away still ends the request with 402; the client's liveness check still holds).
        answer_timeout = (cfg["wait_queue_timeout"] or self.config.default_wait_queue_timeout_ms) / 1000 or float("inf")
        ref = h.get("shm")
        if ref is not None:
            try:
                if client.shm is None:  # a client this manager has not said hello to (it restarted): its probe
                    client.shm = shm.proven(client.id)
                if not client.shm:
                    raise shm.ShmError("the manager cannot read this client's probe segment; send the data in a frame")
                ref = list(shm.parse_ref(ref, client.id))
            except shm.ShmError as exc:
                return self._refuse(reply, rid, name, 999, detail=f"its data cannot be read from shared memory: {exc}")
        stamps = list(h.get("ts") or [])
        stamps.append(["manager_receive", P.now()])
        req = Request(
            mkey=next(self._mkeys),
            client=client.id,
            rid=rid,
            pid=int(h.get("pid") or client.pid),
            tid=int(h.get("tid") or 0),
            inference=name,
            sub=sub or svc.default_sub,
            param=param if isinstance(param, dict) else {},
            arr=h.get("arr"),
            payload=msg.payload,
            time_stamp=stamps,
            send_deadline=now + send_timeout,
            answer_timeout=answer_timeout,
            accepted=now,
            reply=reply,
            lean=h.get("lean") is True,
            shm=ref,
        )
        waiting.append(req)
        self.pump(name)

    # ---- distribution --------------------------------------------------------------

    def waiting(self, name: str = "") -> list[Request]:
        """The requests in send-wait queues (of inference ``name``, "" = all), oldest first per queue."""
        return [r for n, svc in self.services.items() if not name or n == name for r in svc.queue]

    def take_waiting(self, keep_out: Callable[[Request], bool], name: str = "") -> list[Request]:
        """Remove and return the waiting requests (of inference ``name``, "" = all) that
        ``keep_out`` selects. The caller answers them: nothing may be left unanswered."""
        taken: list[Request] = []
        for n, svc in self.services.items():
            if name and n != name:
                continue
            chosen: list[Request] = []
            kept: list[Request] = []
            for r in svc.queue:
                (chosen if keep_out(r) else kept).append(r)
            if chosen:
                svc.queue.clear()
                svc.queue.extend(kept)
                taken.extend(chosen)
        return taken

    def pump(self, name: str) -> None:
        """Send waiting requests of inference ``name`` to instances that can take them."""
        svc = self.services.get(name)
        if svc is None:
            return
        waiting = svc.queue
        while waiting:
            sub = waiting[0].sub
            container = self._pick(svc, sub)
            if container is None:
                return
            size = svc.batch_size(container, sub)
            if size == 1:
                self._dispatch(container, waiting.popleft(), svc.replies)
            elif not self._hold_batch(svc, size):
                self._dispatch_batch(container, self._take_batch(waiting, sub, size), svc.replies)
            else:
                return

    def _hold_batch(self, svc: Service, size: int) -> bool:
        """Whether to wait for more requests before sending a short batch (max_queue_delay),
        with a pump due when the oldest has waited that long."""
        if not svc.batch_delay or len(svc.queue) >= size:
            return False
        due = svc.queue[0].accepted + svc.batch_delay
        if due <= time.monotonic():
            return False
        if not svc.batch_timer or due < svc.batch_timer:
            svc.batch_timer = due
            self.call_later(due - time.monotonic(), self._batch_due, svc.name, due)
        return True

    def _batch_due(self, name: str, due: float) -> None:
        svc = self.services.get(name)
        if svc is not None and svc.batch_timer == due:
            svc.batch_timer = 0.0
            self.pump(name)

    @staticmethod
    def _take_batch(waiting: deque[Request], sub: str, count: int) -> list[Request]:
        """Up to ``count`` requests for module ``sub`` from the head of the queue, in order."""
        batch = [waiting.popleft()]
        while waiting and len(batch) < count and waiting[0].sub == sub:
            batch.append(waiting.popleft())
        return batch

    def _pick(self, svc: Service, sub: str) -> Instance | None:
        """The least loaded routable instance of ``svc`` serving ``sub`` (round robin among
        equals); None when none has credit. Looks at this inference's instances only. For
        an instance that takes batches, max_send_num counts batches (messages) in flight."""
        limit = svc.limit(self.config.default_max_send_num)
        best: list[Instance] = []
        least = limit
        batching = svc.max_batch > 1
        for c in svc.instances.values():
            if batching and svc.batch_size(c, sub) > 1:
                load = len({r.batch for r in c.in_flight.values()})
            else:
                load = len(c.in_flight)
            if load >= limit or load > least or sub not in c.subs or not svc.routable(c):
                continue
            if load < least:
                best, least = [c], load
            else:
                best.append(c)
        if not best:
            return None
        return best[next(self._rr) % len(best)] if len(best) > 1 else best[0]

    def _dispatch(self, c: Instance, req: Request, replies: bool = True) -> None:
        payload = self._payload(c, req)
        if payload is not None:
            self._send_one(c, req, payload, replies)

    def _send_one(self, c: Instance, req: Request, payload: list, replies: bool) -> None:
        header = self._item(c, req, replies)
        P.send(self.container_out, P.encode(P.container_topic(c.id, req.sub), P.REQUEST, header, payload))
        self._sent(c, req, req.mkey)

    def _dispatch_batch(self, c: Instance, batch: list[Request], replies: bool) -> None:
        """Several requests for one module in one message (an instance that asked for batches)."""
        items = [(req, payload) for req in batch if (payload := self._payload(c, req)) is not None]
        if len(items) <= 1:
            return self._send_one(c, *items[0], replies) if items else None
        header = {"items": [self._item(c, req, replies) for req, _ in items]}
        frames = [payload[0] if payload else b"" for _, payload in items]  # one frame per item
        P.send(self.container_out, P.encode(P.container_topic(c.id, batch[0].sub), P.REQUESTS, header, frames))
        for req, _ in items:
            self._sent(c, req, items[0][0].mkey)

    def _payload(self, c: Instance, req: Request) -> list | None:
        """The frames that carry ``req``'s data to ``c``: its own; none when ``c`` reads the
        client's shared memory itself; else the segment's bytes, read here (zero-copy).
        None, and the request ended with 999, when the segment cannot be read."""
        if req.shm is None:
            return req.payload
        if c.shm:
            self.shm_passed += 1
            return req.payload
        try:
            view = self._shm.view(req.shm)
        except shm.ShmError as exc:
            self.end(req, 999, f"its data cannot be read from shared memory: {exc}")
            return None
        self.shm_read += 1
        return [view]

    @staticmethod
    def _item(c: Instance, req: Request, replies: bool) -> dict:
        """What the Connector uses of a request, no more (the time stamps stay here and are
        merged on the way back)."""
        req.time_stamp.append(["manager_send", P.now()])
        header = {
            "mkey": req.mkey,
            "rid": req.rid,
            "pid": req.pid,
            "tid": req.tid,
            "inf": req.inference,
            "sub": req.sub,
            "param": req.param,
            "arr": req.arr,
        }
        if req.shm is not None and c.shm:
            header["shm"] = req.shm
        if not replies:
            header["noreply"] = True
        return header

    def _sent(self, c: Instance, req: Request, batch: int) -> None:
        """``req`` is in flight at ``c``, in the message whose first request is ``batch``."""
        req.container = c.id
        req.batch = batch
        req.answer_deadline = time.monotonic() + req.answer_timeout
        if req.client:
            self.metrics.dispatched(req)
        c.in_flight[req.mkey] = req
        c.tx_bytes += req.nbytes

    def send_warmup(self, c: Instance, payload: list, arr: Any, param: dict, sub: str, timeout: float) -> int:
        """Send the manager's own request to instance ``c`` (not yet READY), bypassing the
        queue; its answer or failure reaches ``Lifecycle.warmed``. Returns its key."""
        now = time.monotonic()
        req = Request(mkey=next(self._mkeys), client="", rid="warmup", pid=os.getpid(), tid=0, inference=c.inference,
                      sub=sub, param=param, arr=arr, payload=payload, time_stamp=[["manager_receive", P.now()]],
                      send_deadline=now, answer_timeout=timeout, accepted=now)
        self._dispatch(c, req)
        return req.mkey

    # ---- containers ----------------------------------------------------------------

    def _on_subscription(self, frames: list) -> None:
        data = frames[0].bytes
        if not data or data[0] not in (0, 1):
            raise P.ProtocolError("not a subscription message")
        parsed = P.parse_container_topic(data[1:])
        if parsed is None:
            raise P.ProtocolError(f"subscription to a topic no container uses: {bytes(data[1:65])!r}")
        cid, sub = parsed
        c = self.containers.get(cid)
        if c is None and data[0] == 1 and cid.startswith(P.ANONYMOUS):
            c = self.lifecycle.stranger(cid, sub)
        if c is None:
            log.debug("subscription from unknown container %r", cid)
            return
        if data[0] == 1:
            c.subs.add(sub)
            if not c.hello:
                self._ping(c)
            elif c.connected:
                self.pump(c.inference)
        elif c.subs == {sub}:  # its last subscription: the container is gone
            self.container_lost(c, "its connection closed")
        else:
            c.subs.discard(sub)

    def _ping(self, c: Instance) -> None:
        c.last_ping = time.monotonic()
        for sub in c.subs:
            P.send(self.container_out, P.encode(P.container_topic(c.id, sub), P.PING, {"mid": self.instance}))

    def _on_container_frames(self, frames: list) -> None:
        msg = P.decode(frames)
        h = msg.header
        c = self.containers.get(str(h.get("cont")))
        if c is None:
            log.debug("message from unknown container %r", h.get("cont"))
            return
        c.last_heard = time.monotonic()
        kind = msg.kind
        if kind not in (P.RESULT, P.RESULTS, P.TAKEN, P.HEARTBEAT, P.HELLO):
            raise P.ProtocolError(f"unknown container message kind {kind!r}")
        # Any message proves its response path (a producer that never receives answers no
        # ping, but its results arrive); a hello says so in as many words.
        if kind == P.HELLO or not c.hello:
            c.heartbeats = c.heartbeats or bool(h.get("hb"))
            if kind == P.HELLO and isinstance(h.get("batch"), int) and h["batch"] > 1:
                c.batch[str(h.get("sub"))] = h["batch"]  # its Connector asks for batches
            if kind == P.HELLO:
                c.shm = h.get("shm") == self.shm_token  # it read our probe
            if not c.hello:
                c.hello = True
                log.info("container %s connected", c.id)
            if c.connected:
                self.lifecycle.connected(c)
                self.pump(c.inference)
        if kind in (P.RESULT, P.TAKEN):
            self._on_answer(c, msg)
        elif kind == P.RESULTS:
            self._on_answers(c, msg)
        elif kind == P.HEARTBEAT:
            c.heartbeats = True
        if c.state is State.UNHEALTHY:
            self.lifecycle.heard(c, kind == P.HEARTBEAT)

    def _on_answer(self, c: Instance, msg: P.Message) -> None:
        if msg.header.get("mkey") is None:
            return self._on_produced(c, msg)
        self._answered(c, msg.header, msg.payload[0] if msg.payload else None, taken=msg.kind == P.TAKEN)
        self.pump(c.inference)

    def _on_answers(self, c: Instance, msg: P.Message) -> None:
        """Results of several requests in one message: each goes to its own caller."""
        items = msg.header.get("items")
        if not isinstance(items, list) or len(items) != len(msg.payload):
            raise P.ProtocolError(f"a batch of results needs one frame per item ({len(msg.payload)} frames)")
        for item, frame in zip(items, msg.payload):
            if isinstance(item, dict) and item.get("mkey") is not None:
                self._answered(c, item, frame)
        self.pump(c.inference)

    def _answered(self, c: Instance, h: dict, frame: Any, taken: bool = False) -> None:
        """The answer ``h`` (with the result ``frame``; ``taken``: an inference with
        output=None took the request) ends its request, unless it is late or a duplicate."""
        mkey = h["mkey"]
        req = c.in_flight.pop(mkey, None)
        if req is None:
            log.debug("late or duplicate answer %r from %s dropped", mkey, c.id)
            return
        if frame is not None:
            c.rx_bytes += len(frame)
        code = 0 if taken else int(h.get("code") or 0)
        if not req.client:
            self.lifecycle.warmed(c, code, h.get("detail") or h.get("msg") or "")
            return
        if code == 0 and req.lean:  # the caller wants the result alone (protocol: "lean")
            header = {"rid": req.rid, "code": 0}
        else:
            stamps = req.time_stamp
            stamps.extend(h.get("ts") or [])
            stamps.append(["manager_result", P.now()])
            header = {"rid": req.rid, "code": code, "resp": self._response(c, req, stamps)}
            if code:
                header["msg"], header["detail"] = h.get("msg") or "", h.get("detail") or ""
        result = [P.pack_value(None)] if taken else [frame] if frame is not None else []
        self.send_to(req.reply, P.RESULT, header, result)
        self.metrics.ended(req, code)

    @staticmethod
    def _response(c: Instance, req: Request, stamps: list) -> dict:
        """The InferenceResponse fields the client does not know (it knows pid, tid, its
        request number, the inference and the param it sent)."""
        return {"metadata_sys": c.metadata_sys(), "sub_inference_name": req.sub, "time_stamp": stamps}

    def _on_produced(self, c: Instance, msg: P.Message) -> None:
        """A result nobody asked for (input=None, output='Main'): to every client."""
        svc = self.services.get(c.inference)
        if svc is None or not svc.replies:
            return
        resp = dict(msg.header.get("resp") or {})
        resp.update(inference_name=c.inference, metadata_sys=c.metadata_sys())
        P.send(self.client_out, P.encode(P.TOPIC_EVENT, P.EVENT, {"code": 0, "msg": "", "what": "result", "resp": resp},
                                         msg.payload[:1]))

    def container_lost(self, c: Instance, why: str, announce: bool = True) -> None:
        """Instance ``c`` is gone from the wire: its requests end with 402, and 114 is
        announced if it was serving (not when it was stopped on purpose)."""
        was_connected = c.connected
        if was_connected:
            c.lost_at = time.monotonic()
        c.hello = False
        c.subs.clear()
        for req in list(c.in_flight.values()):
            self.end(req, 402, detail=f"container {c.suffix} went away while serving it ({why})")
        c.in_flight.clear()
        if was_connected and announce and c.state is not State.STOPPING:
            log.warning("container %s of %s disconnected: %s", c.id, c.inference, why)
            self.announce(114, c.inference, info={"inference_name": c.inference, "suffix_name": c.suffix, "coprocessor": c.board})

    def announce(self, code: int, *fields: Any, info: dict | None = None, what: str = "unsubscribe", message: str = "",
                 detail: str = "") -> None:
        """An event for every client's manage callback: ``(code, message, what, info)``
        (114 with "unsubscribe", a restart with "restart"). ``message``: for code 0, which
        the reference gives no text; ``detail`` also goes in ``info["detail"]``."""
        info = dict(info or {}, detail=detail) if detail else (info or {})
        header = {"code": code, "msg": message or format_message(code, *fields), "detail": detail, "what": what, "info": info}
        P.send(self.client_out, P.encode(P.TOPIC_EVENT, P.EVENT, header))

    # ---- timers ----------------------------------------------------------------------

    def _timers(self) -> None:
        now = time.monotonic()
        self._next_tick = now + TICK
        # Each part on its own: one that fails must not keep the others from running.
        for part in (self._run_later, self._beat, self._ack_slow, self._expire_waiting, self._expire_in_flight,
                     self._ping_silent, self.lifecycle.tick, self._forget_silent_clients):
            try:
                part(now)
            except Exception:
                self._failed(f"timer {getattr(part, '__name__', part)}")

    def _run_later(self, now: float) -> None:
        while self._later and self._later[0][0] <= now:
            _, _, fn, args = heapq.heappop(self._later)
            try:
                fn(*args)
            except Exception:
                self._failed(f"timed {getattr(fn, '__name__', fn)}")

    def _beat(self, now: float) -> None:
        if now >= self._next_beat:
            self._next_beat = now + self.hb_interval
            P.send(self.client_out, P.encode(P.TOPIC_HEARTBEAT, P.HEARTBEAT, {"mid": self.instance}))

    def _ack_slow(self, now: float) -> None:
        """Acknowledge, once and with its deadline, each accepted request not answered within
        ACK_DELAY. Looks at the requests still waiting or in flight only (usually a few,
        however many are answered each second; at most the queues' bound): most never
        need it."""
        cutoff = now - ACK_DELAY
        for svc in self.services.values():
            for req in svc.queue:
                if req.accepted > cutoff:
                    break  # a queue is in order of acceptance
                self._ack(req)
        for c in self.containers.values():
            if c.in_flight:  # most of many containers have nothing in flight
                for req in c.in_flight.values():
                    if req.accepted <= cutoff:
                        self._ack(req)

    def _ack(self, req: Request) -> None:
        if not req.acked and req.client:
            req.acked = True
            left = req.send_deadline - req.accepted + req.answer_timeout
            self.send_client(req.client, P.ACK, {"rid": req.rid, "timeout": left if left != float("inf") else None})

    def _expire_waiting(self, now: float) -> None:
        for name, svc in self.services.items():
            waiting = svc.queue
            while waiting and waiting[0].send_deadline <= now:
                req = waiting.popleft()
                self.end(req, 306, detail=f"no container of {name!r} took it in time")

    def _expire_in_flight(self, now: float) -> None:
        for c in list(self.containers.values()):
            if not c.in_flight:
                continue
            late = [r for r in c.in_flight.values() if r.answer_deadline <= now]
            for req in late:
                del c.in_flight[req.mkey]
                self.end(req, 401, detail=f"container {c.suffix} did not answer in {req.answer_timeout:g} s")
                if req.client:
                    self.lifecycle.overdue(c, req)
            if late:
                self.pump(c.inference)

    def _ping_silent(self, now: float) -> None:
        for c in self.containers.values():
            if c.subs and not c.hello and now - c.last_ping >= PING_INTERVAL:
                self._ping(c)

    def _forget_silent_clients(self, now: float) -> None:
        if now < self._next_client_check:
            return
        self._next_client_check = now + SILENT_CLIENT_CHECK
        limit = self.config.client_timeout_ms / 1000
        for cid in [cid for cid, cl in self.clients.items() if now - cl.last_seen > limit]:
            del self.clients[cid]
            self._shm.forget(shm.owner_prefix(cid))
            dropped = self.take_waiting(lambda r: r.client == cid)  # nobody is left to answer
            if dropped:
                log.info("dropped %d queued requests of silent client %s", len(dropped), cid)


def _bracketed(address: str) -> str:
    """An address as a ZeroMQ tcp endpoint wants it (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address else address


def _rss_bytes() -> int:
    """This process's resident memory (Linux), 0 where /proc is not there."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
