"""A manager's policy without processes, sockets or time: the fast test tier's harness.

The real router, dispatcher, services, health and reconciler run here as they run in the
daemon, but on fakes of what is slow or outside them (as Ray Serve's tests of its
deployment state machine do): a fake clock that moves only when the test says, a loop
that runs its timers when the test steps it, a wire that records what would have been
sent, a runtime whose containers "run" in a dict, and operations that run each slow step
at once. Messages from clients and containers are real protocol messages, handed to the
router's handlers as the loop would.
"""
from __future__ import annotations

import concurrent.futures
import heapq
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from infinibrain import protocol as P
from infinibrain.manager.config import BoardConfig, ManagerConfig
from infinibrain.manager.deadlines import Deadlines
from infinibrain.manager.loop import throttled
from infinibrain.manager.dispatch import Dispatcher
from infinibrain.manager.health import Health
from infinibrain.manager.metrics import NullMetrics
from infinibrain.manager.placement import Change
from infinibrain.manager.reconciler import Reconciler
from infinibrain.manager.registry import Placement, Registration, Registry
from infinibrain.manager.router import Router
from infinibrain.manager.runtimes.base import ContainerSpec, RunInfo
from infinibrain.manager.state import Instance, Nudge, State
from infinibrain.manager.validate import normalize_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeLoop:
    """The loop's interface; timers and calls run when the simulation steps."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.timers: list[Callable[[float], None]] = []
        self.readers: dict[Any, Callable] = {}
        self.later: list[tuple[float, int, Callable, tuple]] = []
        self.soon: list[tuple[Callable, tuple]] = []
        self._seq = itertools.count()

    def reader(self, sock: Any, handle: Callable, dropped: Callable) -> None:
        self.readers[sock] = handle

    def every(self, timer: Callable[[float], None], interval: float = 0.0) -> None:
        self.timers.append(throttled(timer, interval))

    def call_later(self, delay: float, fn: Callable, *args: Any) -> None:
        heapq.heappush(self.later, (self.clock() + delay, next(self._seq), fn, args))

    def call_soon(self, fn: Callable, *args: Any) -> None:
        self.soon.append((fn, args))

    def run(self) -> None:
        """One pass: what was handed in, what is due, then every timer."""
        while self.soon:
            fn, args = self.soon.pop(0)
            fn(*args)
        while self.later and self.later[0][0] <= self.clock():
            _, _, fn, args = heapq.heappop(self.later)
            fn(*args)
        for timer in self.timers:
            timer(self.clock())
        while self.soon:
            fn, args = self.soon.pop(0)
            fn(*args)


class FakeWire:
    """Records what the manager would send."""

    instance = "sim"

    def __init__(self) -> None:
        self.infer_in, self.mgmt_in, self.container_in = "infer", "mgmt", "results"
        self.container_out, self.client_out = _Subscriptions(), _Subscriptions()
        self.to_containers: list[tuple[str, str, dict]] = []  # (instance id, kind, header)
        self.results: dict[str, dict] = {}  # rid -> the result header the client got
        self.events: list[dict] = []
        self.acks: list[dict] = []

    def to_container(self, wire_id: str, sub: str, kind: str, header: dict, payload: Any = ()) -> None:
        self.to_containers.append((wire_id, kind, header))

    def to(self, topic: bytes, kind: str, header: dict, payload: Any = ()) -> None:
        if kind == P.RESULT:
            assert header["rid"] not in self.results, f"request {header['rid']} answered twice"
            self.results[header["rid"]] = header

    def to_client(self, cid: str, kind: str, header: dict, payload: Any = ()) -> None:
        if kind == P.ACK:
            self.acks.append(header)

    def fail(self, topic: bytes, rid: str, code: int, *fields: Any, detail: str = "", **extra: Any) -> None:
        self.to(topic, P.RESULT, {"rid": rid, "code": code, "detail": detail, **extra})

    def event(self, header: dict, payload: Any = ()) -> None:
        self.events.append(header)

    def announce(self, code: int, *fields: Any, info: dict | None = None, what: str = "unsubscribe", message: str = "",
                 detail: str = "") -> None:
        self.events.append({"code": code, "what": what, "info": info or {}, "message": message, "detail": detail})

    def beat(self) -> None:
        pass

    def dropped(self, sock: Any, why: Exception) -> None:
        raise AssertionError(f"the router dropped a message of the simulation: {why}")

    def user_of(self, frame: Any) -> str:
        return ""  # no CURVE here

    def flush(self, now: float) -> None:
        pass


class _Subscriptions:
    """An XPUB socket in manual mode, as far as the router uses it: what it applied."""

    def __init__(self) -> None:
        self.topics: set[bytes] = set()

    def subscribe(self, topic: bytes) -> None:
        self.topics.add(topic)

    def unsubscribe(self, topic: bytes) -> None:
        self.topics.discard(topic)


class FakePayloads:
    passed = read = 0

    def hello(self, client: Any, probe: Any) -> bool:
        return False

    def accept(self, client: Any, ref: Any) -> list:
        raise AssertionError("no shared memory here")

    def forget(self, cid: str) -> None:
        pass

    def container_reads(self, header: Any) -> bool:
        return False

    def frames(self, c: Instance, req: Any) -> list:
        return req.payload


@dataclass
class Box:
    """A container as the fake runtime runs it."""

    running: bool = False
    exit_code: int | None = None
    starts: int = 0


@dataclass
class FakeRuntime:
    """Containers that run in a dict: started at once; a test makes them fail or exit."""

    kind: str = "Loop"
    boxes: dict[str, Box] = field(default_factory=dict)
    fail_start: set[str] = field(default_factory=set)  # ids whose start raises 302
    gone: set[str] = field(default_factory=set)  # ids whose process a board probe finds gone

    def box(self, spec: ContainerSpec) -> Box:
        return self.boxes.setdefault(spec.container_id, Box())

    def prepare(self, spec: ContainerSpec) -> dict:
        return {}

    def prepared(self, spec: ContainerSpec) -> bool:
        return True

    def start(self, spec: ContainerSpec) -> RunInfo:
        from infinibrain.errors import make_error

        if spec.container_id in self.fail_start:
            raise make_error(302, detail=f"{spec.container_id} cannot start")
        box = self.box(spec)
        box.running, box.exit_code, box.starts = True, None, box.starts + 1
        return RunInfo(pid=1000 + box.starts, pid_start=None, created="now")

    def adopt(self, spec: ContainerSpec, pid: int | None, pid_start: int | None) -> bool:
        return self.box(spec).running

    def alive_now(self, spec: ContainerSpec) -> bool:
        return self.box(spec).running and spec.container_id not in self.gone

    def stop(self, spec: ContainerSpec) -> None:
        self.box(spec).running = False

    def exited(self, spec: ContainerSpec) -> int | None:
        return self.box(spec).exit_code

    def remove(self, spec: ContainerSpec) -> None:
        self.boxes.pop(spec.container_id, None)

    def logs(self, spec: ContainerSpec, lines: int) -> str:
        return "the last line"


class FakeOps:
    """Each slow step runs at once, on the test's thread; its outcome still comes back
    through the loop, as a worker's does."""

    def submit(self, fn: Callable, *args: Any, sink: Any = None, board: str = "") -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut


class FakeBoard:
    def __init__(self, config: BoardConfig, runtime: FakeRuntime, folder: Path) -> None:
        self.config = config
        self.name = config.name
        self._runtime = runtime
        self.folder = folder

    def paths(self, iid: str, suffix: str) -> tuple[Path, Path]:
        return self.folder / iid, self.folder / f"{suffix}.log"

    def environment(self, manager: ManagerConfig) -> dict[str, str]:
        return {}

    def runtime(self, kind: str) -> FakeRuntime:
        return self._runtime


class FakeGuard:
    """CURVE off: every peer is its claims."""

    def grant(self, instance: str) -> dict[str, str]:
        return {}

    def revoke(self, instance: str) -> None:
        pass


class Sim:
    """One manager's policy: the real parts on the fakes above."""

    def __init__(self, folder: Path, boards: tuple[str, ...] = ("a", "b"), surge: bool = True, **manager: Any) -> None:
        self.clock = FakeClock()
        self.config = ManagerConfig(state_dir=str(folder), boards=tuple(BoardConfig(b, surge=surge) for b in boards), **manager)
        self.loop = FakeLoop(self.clock)
        self.wire = FakeWire()
        self.runtime = FakeRuntime()
        nudge = Nudge()
        self.health = Health(self.config.liveness_timeout_ms / 1000, nudge, self.clock)
        self.clients: dict = {}
        self.dispatcher = Dispatcher(self.config, self.loop, self.wire, FakePayloads(), self.health, nudge,  # type: ignore[arg-type]
                                     NullMetrics(), self.clock, self.clients)
        Deadlines(self.loop, self.wire, self.health, self.dispatcher)  # type: ignore[arg-type]
        self.registry = Registry(folder)
        self.boards = {b.name: FakeBoard(b, self.runtime, folder) for b in self.config.boards}
        self.reconciler = Reconciler(self.config, self.loop, self.wire, self.dispatcher, self.health, self.registry,  # type: ignore[arg-type]
                                     self.boards, FakeOps(), FakeGuard(), nudge, NullMetrics(), self.clock)  # type: ignore[arg-type]
        self.router = Router(self.config, self.loop, self.wire, FakeGuard(), self.dispatcher, self.health, FakePayloads(),  # type: ignore[arg-type]
                             self.clients, None, self.reconciler.stranger, self.clock)  # type: ignore[arg-type]
        self._rids = itertools.count(1)

    def close(self) -> None:
        self.registry.close()

    # ---- time ---------------------------------------------------------------------------------

    def step(self, seconds: float = 0.0, passes: int = 3) -> None:
        """Let ``seconds`` pass, then run the loop a few times (timers, steps' outcomes)."""
        self.clock.now += seconds
        for _ in range(passes):
            self.loop.run()

    def run_for(self, seconds: float, tick: float = 0.05) -> None:
        """Let time pass in ticks, as the loop's timer passes would see it."""
        for _ in range(round(seconds / tick)):
            self.step(tick, passes=1)

    # ---- the control plane ------------------------------------------------------------------------

    def deploy(self, name: str, boards: tuple[str, ...] = ("a",), **settings: Any) -> Change:
        """Register ``name`` (a Loop inference taking requests) on ``boards``, as load_inference does."""
        cfg = normalize_config({"name": name, "implementation_type": "Loop", "input": "Main", "output": "Main", **settings})
        reg = Registration(name, cfg, {b: Placement() for b in boards})
        self.registry.registrations[name] = reg
        self.dispatcher.open_service(reg)
        change = Change("load_inference", name, list(boards))
        self.reconciler.watch(change)
        self.step()
        return change

    def instance(self, name: str, board: str = "a") -> Instance:
        inst = self.reconciler.current(name, board)
        assert inst is not None, f"{name} has no instance on {board}"
        return inst

    def serve(self, name: str, board: str = "a") -> Instance:
        """The instance of ``name`` on ``board``, its Connector connected (and ready)."""
        inst = self.instance(name, board)
        self.connect(inst)
        self.step()
        return inst

    # ---- containers' messages ---------------------------------------------------------------------

    def subscribe(self, inst: Instance, sub: str | None = None, on: bool = True) -> None:
        topic = P.container_topic(inst.id, sub or inst.spec.config.default_sub)
        self.router._on_subscription([_Frame(bytes([1 if on else 0]) + topic)])

    def from_container(self, inst: Instance, kind: str, header: dict, payload: list | tuple = ()) -> None:
        self.router._on_container_frames(P.encode(P.TOPIC_MANAGER, kind, {"cont": inst.id, **header}, payload))

    def connect(self, inst: Instance, hb: int = 2500) -> None:
        """Its Connector subscribes and says hello, as a real one does."""
        self.subscribe(inst)
        self.from_container(inst, P.HELLO, {"sub": inst.spec.config.default_sub, "hb": hb})

    def beat(self, inst: Instance) -> None:
        self.from_container(inst, P.HEARTBEAT, {"sub": inst.spec.config.default_sub})

    def answer(self, inst: Instance, mkey: int, code: int = 0) -> None:
        self.from_container(inst, P.RESULT, {"mkey": mkey, "code": code, "msg": "", "detail": "", "ts": []},
                            [P.pack_value({"by": inst.id})])

    def held(self, inst: Instance) -> list[int]:
        """The keys of the requests ``inst`` holds now (in the order they were sent)."""
        return list(inst.in_flight)

    def sent_to(self, inst: Instance) -> list[dict]:
        """The request headers sent to ``inst`` so far."""
        out = []
        for wid, kind, header in self.wire.to_containers:
            if wid == inst.id and kind == P.REQUEST:
                out.append(header)
            elif wid == inst.id and kind == P.REQUESTS:
                out.extend(header["items"])
        return out

    # ---- clients' messages ---------------------------------------------------------------------------

    def request(self, name: str, priority: Any = 0, param: dict | None = None, client: str = "c1") -> str:
        rid = str(next(self._rids))
        header = {"cid": client, "pid": 7, "rid": rid, "inf": name, "param": param or {}, "arr": None}
        if priority != 0:
            header["pri"] = priority
        self.router._on_client_frames(P.encode(P.TOPIC_MANAGER, P.REQUEST, header, [b"data"]))
        return rid

    def code(self, rid: str) -> int | None:
        """How request ``rid`` ended (None: it has not)."""
        header = self.wire.results.get(rid)
        return None if header is None else header["code"]


class _Frame:
    """What the XPUB socket gives for a subscription: a frame with ``bytes``."""

    def __init__(self, data: bytes) -> None:
        self.bytes = data


__all__ = ["Sim", "State"]
