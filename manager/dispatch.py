"""The request path: accept a request, queue it, send it to a container, end it.

Every request ends in a result or a numbered error: 305 at once when its inference's queue
is full (with ``retry_after``) or its client already has ``max_client_requests`` requests
(or ``max_client_bytes`` of data) waiting or in flight, 306 when it waited too long to be sent, 401 when its answer
is late, 402 when its container went away (after being sent again to another container,
up to the inference's ``retries``, when one serves), 404 when ``delete_queue`` took it out.

The policy (which container, in which order, how many at once) is each inference's
``Service`` (service.py); acknowledgements and deadlines are deadlines.py's timers; whether a container may serve is ``Health``'s (health.py); how
the data travels is ``Payloads``' (payloads.py); the sockets are the ``Wire``'s. This
module moves requests between them. The reconciler reaches it to open and close services,
add and remove instances, warm them up and take them out of service.

Router thread, all of it.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import random
from typing import Any, Callable

from infinibrain import protocol as P
from infinibrain import shm
from infinibrain.errors import format_message

from .config import ManagerConfig
from .health import Health
from .loop import Loop
from .metrics import NullMetrics
from .payloads import Payloads
from .registry import Registration
from .service import Service
from .settings import resolve
from .state import Client, Clock, Instance, Nudge, Origin, Request, State, caller_id
from .tracing import NullTracing
from .wire import Wire

log = logging.getLogger("infinibrain.manager.router")

class Dispatcher:
    def __init__(self, config: ManagerConfig, loop: Loop, wire: Wire, payloads: Payloads, health: Health, nudge: Nudge,
                 metrics: NullMetrics, clock: Clock, clients: dict[str, Client], tracing: NullTracing | None = None) -> None:
        self.tracing = tracing or NullTracing()
        self.config = config
        self.clock = clock
        self.clients = clients  # every client the manager hears from (the router's): their outstanding requests
        self.wire = wire
        self.payloads = payloads
        self.health = health
        self.nudge = nudge
        self.metrics = metrics
        self.services: dict[str, Service] = {}
        self.containers: dict[str, Instance] = {}  # every instance, by its wire id
        self.aging = config.priority_aging_ms / 1000
        self.retried = 0  # requests sent again because their container went away
        self.callers: dict[str, Client] = {}  # containers that make calls, as clients (calls.py)
        # (inference, board) -> seconds its containers spent on answered requests, and how many, since
        # energy.py last took them (kept only while board telemetry, which energy needs, is on)
        self.counts_busy = config.telemetry_interval_ms > 0
        self.busy: collections.defaultdict[tuple[str, str], float] = collections.defaultdict(float)
        self.served: collections.Counter[tuple[str, str]] = collections.Counter()
        self.batches = [0, 0]  # messages of two or more requests sent, and the requests in them
        self._no_input: list[str] = []  # inferences registered with input=None (clients are told)
        # Another manager instance (before a restart) numbered its requests from elsewhere,
        # so a late answer to one of its requests can never be taken for one of ours.
        self._mkeys = itertools.count(random.getrandbits(40) << 12)
        self._loop = loop

    @property
    def no_input(self) -> list[str]:
        return self._no_input

    # ---- services and instances (the reconciler's door) ---------------------------------------

    def queued(self, name: str) -> int:
        """Requests waiting to be sent for inference ``name`` (0 without a service)."""
        svc = self.services.get(name)
        return len(svc.queue) if svc is not None else 0

    def open_service(self, reg: Registration) -> None:
        """Route requests for ``reg`` (new, or new settings of a registered inference)."""
        policy = resolve(reg.config, self.config)
        svc = self.services.get(reg.name)
        if svc is None:
            svc = self.services[reg.name] = Service(reg, policy, self.aging)
            for c in self.containers.values():
                if c.inference == reg.name:
                    svc.instances[c.id] = c
        else:
            svc.update(reg, policy)
        self._tell_inputs()
        self.pump(reg.name)

    def close_service(self, name: str, why: str) -> None:
        """Stop routing ``name``: its waiting requests end with 400."""
        svc = self.services.pop(name, None)
        if svc is None:
            return
        self._tell_inputs()
        for req in svc.queue.remove(lambda r: True):
            self.end(req, 400, detail=f"inference {name!r} {why} while the request waited")

    def _tell_inputs(self) -> None:
        """Clients refuse requests for inferences that take none (input=None, 403) at call
        time: they learn the list in the hello_ack, and here whenever it changes."""
        names = sorted(n for n, svc in self.services.items() if not svc.takes_input)
        if names != self._no_input:
            self._no_input = names
            self.wire.event({"what": "inputs", "no_input": names})

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
        self._forget_caller(caller_id(c))
        self.containers.pop(old, None)
        c.id = wire_id
        self.containers[wire_id] = c
        svc = self.services.get(c.inference)
        if svc is not None:
            svc.instances.pop(old, None)
            svc.instances[wire_id] = c

    def _forget_caller(self, cid: str) -> None:
        """A calling instance is gone: its calls still waiting are dropped (their answers
        would go nowhere), its segments no longer read."""
        if self.callers.pop(cid, None) is not None:
            for req in self.take_waiting(lambda r: r.client == cid):
                self.end(req, 402, "the container that made this call went away")
            self.payloads.forget(cid)

    def remove_instance(self, c: Instance) -> None:
        self.container_lost(c, "it was removed", announce=False)
        self._forget_caller(caller_id(c))
        if self.containers.get(c.id) is c:
            del self.containers[c.id]
        svc = self.services.get(c.inference)
        if svc is not None and svc.instances.get(c.id) is c:
            del svc.instances[c.id]

    # ---- accepting ----------------------------------------------------------------------------

    def accept(self, client: Client, msg: P.Message, origin: Origin | None = None, reply: bytes = b"") -> None:
        """A client's request: refused at once, or queued (and sent if a container may take
        it). A container's call (calls.py) has an ``origin``, which sets its priority and
        bounds its deadline, and a ``reply`` topic, the calling Connector's."""
        h = msg.header
        rid, name = str(h["rid"]), h.get("inf")
        reply = reply or P.reply_topic(client.id, h.get("to"))
        svc = self.services.get(name) if isinstance(name, str) else None
        if svc is None or not isinstance(name, str):
            return self._refuse(reply, rid, name, 400, detail=f"inference {name!r} is not registered")
        if not svc.takes_input:
            return self._refuse(reply, rid, name, 403, name)
        param = h.get("param")
        sub = param.get("sub_inference_name") if isinstance(param, dict) else None
        if sub and sub not in svc.modules:
            return self._refuse(reply, rid, name, 400, detail=f"inference {name!r} has no module {sub!r} (it has {', '.join(svc.modules)})")
        priority = h.get("pri", 0) if origin is None else origin.priority
        if not P.valid_priority(priority):
            return self._refuse(reply, rid, name, 100, "priority", detail=f"priority must be a 32-bit integer, got {priority!r}")
        now = self.clock()
        if svc.full():
            wait = svc.retry_after(now)
            return self._refuse(reply, rid, name, 305, retry_after=wait,
                                detail=f"{len(svc.queue)} requests wait for {name!r} (max_queue_size {svc.policy.max_queue_size}); "
                                       f"retry after {wait:g} s")
        ref = h.get("shm")
        if ref is not None:
            try:
                ref = self.payloads.accept(client, ref)
            except shm.ShmError as exc:
                return self._refuse(reply, rid, name, 999, detail=f"its data cannot be read from shared memory: {exc}")
        nbytes = sum(len(f) for f in msg.payload) + (ref[1] if ref is not None else 0)
        if client.outstanding >= self.config.max_client_requests or \
                client.outstanding_bytes + nbytes > self.config.max_client_bytes:
            return self._refuse(reply, rid, name, 305, retry_after=svc.retry_after(now),
                                detail=f"this client has {client.outstanding} requests ({client.outstanding_bytes} bytes) waiting "
                                       f"or in flight: at most max_client_requests {self.config.max_client_requests} "
                                       f"and max_client_bytes {self.config.max_client_bytes}")
        stamps = list(h.get("ts") or [])
        stamps.append(["manager_receive", P.now()])
        policy = svc.policy
        deadline = now + policy.send_timeout + policy.answer_timeout
        if origin is not None:  # it must end before the request that waits for it
            deadline = min(deadline, origin.deadline)
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
            send_deadline=min(now + policy.send_timeout, deadline),
            answer_timeout=policy.answer_timeout,
            deadline=deadline,
            accepted=now,
            reply=reply,
            lean=h.get("lean") is True,
            shm=ref,
            priority=priority,
            nbytes=nbytes,
            chain=origin.chain if origin is not None else (),
            acked=origin is not None,  # a container's call waits by its own deadline: never acknowledged
        )
        client.outstanding += 1
        client.outstanding_bytes += nbytes
        if self.tracing.enabled and "tp" in h:
            self.tracing.accepted(req, h["tp"])
        if not svc.queue:  # the usual case: nothing waits, so it goes first if a container may take it
            c = svc.pick(req.sub)
            if c is not None and svc.batch_size(c, req.sub) == 1:
                return self._dispatch(c, req, svc)
        svc.queue.push(req)
        self.pump(name)

    def _refuse(self, reply: bytes, rid: str, name: Any, code: int, *fields: Any, detail: str = "", **extra: Any) -> None:
        """Refuse a request before accepting it (and count it)."""
        self.wire.fail(reply, rid, code, *fields, detail=detail, **extra)
        self.metrics.refused(name if isinstance(name, str) and name in self.services else "", code)

    # ---- sending ----------------------------------------------------------------------------------

    def pump(self, name: str) -> None:
        """Send waiting requests of inference ``name`` to instances that can take them."""
        svc = self.services.get(name)
        if svc is None:
            return
        queue = svc.queue
        while queue:
            sub = queue.head().sub  # type: ignore[union-attr]
            c = svc.pick(sub)
            if c is None:
                return
            size = svc.batch_size(c, sub)
            if size == 1:
                self._dispatch(c, queue.pop(), svc)
                continue
            due = svc.hold_until(size, self.clock())
            if due:
                return self._hold(svc, due)
            self._dispatch_batch(c, queue.take(sub, size), svc)

    def _hold(self, svc: Service, due: float) -> None:
        """A short batch waits for more until ``due``: a pump is due then."""
        if not svc.batch_timer or due < svc.batch_timer:
            svc.batch_timer = due
            self._loop.call_later(due - self.clock(), self._batch_due, svc.name, due)

    def _batch_due(self, name: str, due: float) -> None:
        svc = self.services.get(name)
        if svc is not None and svc.batch_timer == due:
            svc.batch_timer = 0.0
            self.pump(name)

    def _frames(self, c: Instance, req: Request) -> list | None:
        """``req``'s data frames for ``c``; None (the request ended with 999) when its
        shared memory cannot be read."""
        try:
            return self.payloads.frames(c, req)
        except shm.ShmError as exc:
            self.end(req, 999, f"its data cannot be read from shared memory: {exc}")
            return None

    def _dispatch(self, c: Instance, req: Request, svc: Service | None) -> None:
        payload = req.payload if req.shm is None else self._frames(c, req)
        if payload is not None:
            self._send_one(c, req, payload, svc)

    def _header(self, c: Instance, req: Request, replies: bool) -> dict:
        """``req``'s header for ``c``, with the trace context it hands on when it is traced."""
        header = _request_header(c, req, replies)
        if req.trace is not None:
            header["tp"] = self.tracing.sent(req)
        return header

    def _send_one(self, c: Instance, req: Request, payload: list, svc: Service | None) -> None:
        self.wire.to_container(c.id, req.sub, P.REQUEST, self._header(c, req, svc is None or svc.replies), payload)
        self._sent(c, req, req.mkey, svc)

    def _dispatch_batch(self, c: Instance, batch: list[Request], svc: Service) -> None:
        """Several requests for one module in one message (an instance that asked for batches)."""
        items = [(req, payload) for req in batch if (payload := self._frames(c, req)) is not None]
        if len(items) <= 1:
            return self._send_one(c, *items[0], svc) if items else None
        header = {"items": [self._header(c, req, svc.replies) for req, _ in items]}
        frames = [payload[0] if payload else b"" for _, payload in items]  # one frame per item
        self.wire.to_container(c.id, batch[0].sub, P.REQUESTS, header, frames)
        self.batches[0] += 1
        self.batches[1] += len(items)
        for req, _ in items:
            self._sent(c, req, items[0][0].mkey, svc)

    def _sent(self, c: Instance, req: Request, batch: int, svc: Service | None) -> None:
        """``req`` is in flight at ``c``, in the message whose first request is ``batch``."""
        now = self.clock()
        req.container = c.id
        req.batch = batch
        req.sent = now
        deadline = now + req.answer_timeout
        req.answer_deadline = deadline if deadline < req.deadline else req.deadline
        c.in_flight[req.mkey] = req
        c.tx_bytes += req.nbytes
        if req.client:
            self.metrics.dispatched(req)
        if svc is not None:
            svc.sent += 1

    def send_warmup(self, c: Instance, payload: list, arr: Any, param: dict, sub: str, timeout: float) -> int:
        """Send the manager's own request to instance ``c`` (not yet READY), bypassing the
        queue; how it ends goes to ``c.warmed``. Returns its key."""
        now = self.clock()
        req = Request(mkey=next(self._mkeys), client="", rid="warmup", pid=os.getpid(), tid=0, inference=c.inference,
                      sub=sub, param=param, arr=arr, payload=payload, time_stamp=[["manager_receive", P.now()]],
                      send_deadline=now, answer_timeout=timeout, deadline=now + timeout, accepted=now,
                      nbytes=sum(len(f) for f in payload))
        c.warmed = None
        self._dispatch(c, req, None)
        return req.mkey

    # ---- answers ------------------------------------------------------------------------------------

    def answered(self, c: Instance, h: dict, frame: Any, taken: bool = False) -> bool:
        """The answer ``h`` (with the result ``frame``; ``taken``: an inference with
        output=None took the request) ends its request, unless it is late or a duplicate.
        Whether ``c`` may take more now (the caller pumps)."""
        mkey = h["mkey"]
        req = c.in_flight.pop(mkey, None)
        if req is None:
            log.debug("late or duplicate answer %r from %s dropped", mkey, c.id)
            return self.health.answered(c, mkey)
        if frame is not None:
            c.rx_bytes += len(frame)
        if self.counts_busy:
            where = (c.inference, c.board)
            self.busy[where] += self.clock() - req.sent
            self.served[where] += 1
        code = 0 if taken else int(h.get("code") or 0)
        if not req.client:
            self._warmed(c, req, code, h.get("detail") or h.get("msg") or "")
            return True
        if req.trace is not None:
            self.tracing.ended(req, code, h.get("cs"), {"infinibrain.container": c.suffix, "infinibrain.board": c.board})
        if code == 0 and req.lean:  # the caller wants the result alone (protocol: "lean")
            header = {"rid": req.rid, "code": 0}
        else:
            stamps = req.time_stamp
            stamps.extend(h.get("ts") or [])
            stamps.append(["manager_result", P.now()])
            header = {"rid": req.rid, "code": code, "resp": {"metadata_sys": c.metadata_sys(req.sub), "sub_inference_name": req.sub,
                                                              "time_stamp": stamps}}
            if code:
                header["msg"], header["detail"] = h.get("msg") or "", h.get("detail") or ""
        result = [P.pack_value(None)] if taken else [frame] if frame is not None else []
        self.wire.to(req.reply, P.RESULT, header, result)
        self.metrics.ended(req, code)
        self._release(req)
        return True

    def _release(self, req: Request) -> None:
        """``req`` ended: no longer its client's to count."""
        client = (self.callers if req.chain else self.clients).get(req.client)
        if client is not None:
            client.outstanding -= 1
            client.outstanding_bytes -= req.nbytes

    def _warmed(self, c: Instance, req: Request, code: int, why: str) -> None:
        if req.mkey == c.warmup_key:
            c.warmed = (code, why)
            self.nudge.set()

    def produced(self, c: Instance, msg: P.Message) -> None:
        """A result nobody asked for (input=None, output='Main'): to every client."""
        svc = self.services.get(c.inference)
        if svc is None or not svc.replies:
            return
        resp = dict(msg.header.get("resp") or {})
        resp.update(inference_name=c.inference, metadata_sys=c.metadata_sys(resp.get("sub_inference_name")))
        self.wire.event({"code": 0, "msg": "", "what": "result", "resp": resp}, msg.payload[:1])

    # ---- ending --------------------------------------------------------------------------------------

    def end(self, req: Request, code: int, detail: str) -> None:
        """End accepted request ``req`` with a numbered error (and count it)."""
        if not req.client:  # the manager's own (a warm-up): its instance hears of it
            c = self.containers.get(req.container or "")
            if c is not None:
                self._warmed(c, req, code, detail or format_message(code))
            return
        if req.trace is not None:
            self.tracing.ended(req, code)
        self.wire.fail(req.reply, req.rid, code, detail=detail)
        self.metrics.ended(req, code)
        self._release(req)

    def container_lost(self, c: Instance, why: str, announce: bool = True) -> None:
        """Instance ``c`` is gone from the wire: each request it held is sent to another
        container if the inference's ``retries`` allow and time is left, else ends with
        402; 114 is announced if it was serving (not when it was stopped on purpose)."""
        was_connected = c.connected
        if was_connected:
            c.lost_at = self.clock()
        c.hello = False
        c.subs.clear()
        self.health.lost(c, why)
        held, c.in_flight = list(c.in_flight.values()), {}
        again = False
        lost = f"container {c.suffix} went away while serving it ({why})"
        for req in held:
            if self._again(req, lost):
                again = True
            else:
                self.end(req, 402, detail=lost)
        if was_connected and announce and c.state is not State.STOPPING:
            log.warning("container %s of %s disconnected: %s", c.id, c.inference, why)
            self.wire.announce(114, c.inference, info={"inference_name": c.inference, "suffix_name": c.suffix, "coprocessor": c.board})
        if again:
            self.pump(c.inference)

    def _again(self, req: Request, lost: str) -> bool:
        """Queue ``req`` (whose container went away before answering) to be sent to another
        container, if its inference's ``retries`` allow it and its deadline is not past."""
        svc = self.services.get(req.inference)
        now = self.clock()
        if not req.client or svc is None or req.tries >= svc.policy.retries or req.deadline <= now:
            return False
        req.tries += 1
        req.container = None
        req.lost = lost
        req.send_deadline = min(now + svc.policy.send_timeout, req.deadline)
        svc.queue.push(req)
        self.retried += 1
        self.metrics.retried(req)
        log.info("request %s of %s sent again (try %d): %s", req.rid, req.inference, req.tries + 1, req.lost)
        return True

    # ---- queues ----------------------------------------------------------------------------------------

    def waiting(self, name: str = "") -> list[Request]:
        """The requests in send-wait queues (of inference ``name``, "" = all), in the order each queue sends them."""
        return [r for n, svc in self.services.items() if not name or n == name for r in svc.queue]

    def take_waiting(self, keep_out: Callable[[Request], bool], name: str = "") -> list[Request]:
        """Remove and return the waiting requests (of inference ``name``, "" = all) that
        ``keep_out`` selects. The caller answers them: nothing may be left unanswered."""
        return [r for n, svc in self.services.items() if not name or n == name for r in svc.queue.remove(keep_out)]


def _request_header(c: Instance, req: Request, replies: bool) -> dict:
    """What the Connector uses of a request, no more (the time stamps stay here and are
    merged on the way back)."""
    req.time_stamp.append(["manager_send", P.now()])
    header = {"mkey": req.mkey, "rid": req.rid, "pid": req.pid, "tid": req.tid, "inf": req.inference, "sub": req.sub,
              "param": req.param, "arr": req.arr}
    if req.shm is not None and c.shm:
        header["shm"] = req.shm
    if not replies:
        header["noreply"] = True
    return header
