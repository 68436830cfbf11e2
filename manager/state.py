"""What the manager keeps in memory about what runs: instances, requests, clients.

All of it is owned by the router thread; worker threads reach it only through
``Loop.call`` / ``Loop.call_soon`` (manager/loop.py), so none of it needs a lock. Worker
threads may read an instance's ``spec`` and ``runtime``, which never change after the
instance is made (but for an ``other`` container's, which no worker runs).

An *instance* is one container of one inference on one board at one revision of its
settings. A placement (inference, board; the reference's ContainerHandler, named by its
``suffix_name``) usually has one; during a rolling update it has two for a while, the old
revision draining while the new one starts.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from infinibrain import shm

from .runtimes.base import ContainerSpec, Runtime

log = logging.getLogger("infinibrain.manager.state")

Clock = Callable[[], float]  # seconds, monotonic: time.monotonic, or a test's fake clock


class State(str, enum.Enum):
    """Where an instance is in its life. Only READY instances receive requests."""

    PENDING = "pending"  # wanted; a worker has not started it yet
    STARTING = "starting"  # being made or started, or waiting for its Connector (and warm-up)
    READY = "ready"  # connected (and warmed up): it serves
    UNHEALTHY = "unhealthy"  # it held a request past its deadline, fell silent, or lost its connection (health.py)
    STOPPING = "stopping"  # draining its requests, or being stopped
    STOPPED = "stopped"  # not running, on purpose
    FAILED = "failed"  # it exited by itself, or could not start or become ready

    def __str__(self) -> str:
        return self.value


RUNNING_STATES = (State.STARTING, State.READY, State.UNHEALTHY, State.STOPPING)


@dataclass(slots=True)  # one per request, made and read on the hot path
class Request:
    """One inference request inside the manager, from acceptance to its answer."""

    mkey: int  # the manager's own number for it; containers answer with it
    client: str  # "" for the manager's own requests (warm-ups)
    rid: str  # the client's request number
    pid: int
    tid: int
    inference: str
    sub: str  # module that must serve it
    param: Any
    arr: Any  # array description, or None for bytes
    payload: list
    time_stamp: list
    send_deadline: float  # sent to a container by then, or it ends (306)
    answer_timeout: float
    deadline: float = 0.0  # the latest it may end: send_timeout + answer_timeout from acceptance (inf: no limit)
    answer_deadline: float = 0.0
    container: str | None = None
    batch: int = 0  # the mkey of the first request of the message it was sent in (dynamic batching)
    accepted: float = 0.0  # time.monotonic() when the manager accepted it
    acked: bool = False  # acknowledged to its client (it took longer than deadlines.ACK_DELAY)
    reply: bytes = b""  # the topic its answer goes to (protocol.reply_topic)
    lean: bool = False  # its client wants a result without the InferenceResponse's fields
    shm: Any = None  # [segment, bytes]: its data is in its client's shared memory, not in payload
    priority: int = 0  # higher is sent first (waitqueue.py)
    tries: int = 0  # times it was sent again because its container went away (retries)
    lost: str = ""  # why it is waiting again: its container went away (ends with 402, not 306)
    nbytes: int = 0  # bytes of its data (frames, or in shared memory): counted against its client and board
    chain: tuple[str, ...] = ()  # a container's call (calls.py): the inferences waiting for it, outermost first
    sent: float = 0.0  # when it was last sent to a container (its service time: energy.py)
    trace: Any = None  # its spans, when its application traces it (tracing.py)

    @property
    def queued_wall(self) -> float:
        """When the manager accepted it (wall clock), from its time stamps."""
        return next(t for stage, t in self.time_stamp if stage == "manager_receive")


@dataclass(frozen=True)
class Origin:
    """What bounds a request a container makes while serving another (calls.py)."""

    priority: int  # the request it serves (0 outside any)
    deadline: float  # monotonic; it must end by then (inf outside any request)
    chain: tuple[str, ...]  # the inferences waiting for it, outermost first (the caller's last)


@dataclass(eq=False)
class Instance:
    """One container of an inference on a board, as the manager sees it."""

    id: str  # its identity on the wire (INFINIBRAIN_INSTANCE): <suffix_name>.r<revision>
    suffix: str  # ContainerHandler.suffix_name: <inference>-<board>
    inference: str
    board: str
    revision: int
    spec: ContainerSpec
    runtime: Runtime
    state: State = State.PENDING
    # The wire: what the router knows of its Connector(s).
    subs: set[str] = field(default_factory=set)  # subscriptions seen on the XPUB socket
    hello: bool = False  # its response path has been proven
    heartbeats: bool = False  # its Connector says it beats while idle (liveness)
    last_heard: float = 0.0  # monotonic time of its last message
    last_ping: float = 0.0
    in_flight: dict[int, Request] = field(default_factory=dict)
    late: set[int] = field(default_factory=set)  # mkeys it held past their deadline and has not answered (health.py)
    unfit: str = ""  # UNHEALTHY: "late", "silent" or "gone" (health.py)
    batch: dict[str, int] = field(default_factory=dict)  # module -> requests per message its Connector takes
    shm: bool = False  # its Connector read the manager's probe: it reads requests' shared memory itself
    tx_bytes: int = 0
    rx_bytes: int = 0
    # The lifecycle: what the reconciler knows.
    running: bool = False  # its process is believed to run
    ready_deadline: float = 0.0  # STARTING: ready by then, or it failed
    drain_deadline: float = 0.0  # STOPPING: its requests have until then
    since: float = 0.0  # when it entered its state
    why: str = ""  # what put it in its state (unhealthy, failed)
    warmup: tuple | None = None  # (payload, array description, param, module) sent once it connects
    warmup_key: int | None = None  # the mkey of its warm-up request, while it runs
    warmed: tuple[int, str] | None = None  # how its warm-up ended: (0, "") or (code, why)
    lost_at: float = 0.0  # when its connection was last lost
    probed_at: float = 0.0  # when the board was last asked whether its process still runs
    deploy_started: float = 0.0  # when its start step began, until it is ready (0: adopted, or ready)
    started_at: float = 0.0  # when its last start step began
    pid: int | None = None
    pid_start: int | None = None
    created: str = ""
    deployment: dict = field(default_factory=dict)  # what its deployment took (image sent, seconds)

    @property
    def connected(self) -> bool:
        return self.hello and bool(self.subs)

    def enter(self, state: State, why: str, now: float) -> bool:
        """Move to ``state`` at ``now`` (the reconciler and health.py do); whether it changed."""
        if self.state is state:
            return False
        log.log(logging.WARNING if state in (State.FAILED, State.UNHEALTHY) else logging.DEBUG,
                "container %s: %s -> %s%s", self.id, self.state, state, f" ({why})" if why else "")
        self.state, self.since, self.why = state, now, why
        if state is not State.UNHEALTHY:
            self.unfit = ""
        return True

    def metadata_sys(self, sub: str | None = None) -> dict:
        """Where it ran, as InferenceResponse.metadata_sys tells it; with module ``sub``'s
        ``model_tag`` and ``script_tag`` when its settings give them (what was deployed,
        not what the container says)."""
        out = {"board": self.board, "container": self.suffix, "instance": self.id}
        out.update(self.spec.config.module_tags.get(sub or "") or {})
        return out

    @property
    def serving(self) -> bool:
        """Whether requests may be sent to it now."""
        return self.state is State.READY and self.hello and bool(self.subs)


CALLER_PREFIX = shm.CALLER_PREFIX


def caller_id(c: Instance) -> str:
    """The client id a container's calls are counted under (calls.py), which is also the
    owner of the shared memory segments its calls name (shm.caller_owner)."""
    return shm.caller_owner(c.id)


def instance_id(suffix: str, revision: int) -> str:
    return f"{suffix}.r{revision}"


@dataclass
class Client:
    """An application the manager hears from, bound to the key that first spoke for it."""

    id: str
    pid: int
    last_seen: float
    user: str = ""  # the key its connections proved (ZAP's User-Id); "" without CURVE
    role: str = "manage"  # what its key may do: "manage" or "infer" (auth.py)
    shm: bool | None = None  # whether the manager read its probe (None: not tried): it may name its segments (infinibrain/shm.py)
    outstanding: int = 0  # its requests waiting or in flight (max_client_requests)
    outstanding_bytes: int = 0  # their data (max_client_bytes)


class Nudge:
    """The one door from the request path to the reconciler: "something changed, look now"
    (a container connected, a warm-up ended, one became unhealthy). The reconciler takes
    it at its next pass; nothing else crosses. Router thread."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = True

    def set(self) -> None:
        self._set = True

    def take(self) -> bool:
        was, self._set = self._set, False
        return was
