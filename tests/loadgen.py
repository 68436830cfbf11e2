"""Load for fault tests: threads sending requests while something breaks, and a record
of how every request ended; hostile clients in processes of their own (``flood``)."""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import msgpack
import zmq

from infinibrain import AICluster, security
from infinibrain import protocol as P
from infinibrain.errors import InfinibrainException

SEND_TIMEOUT_MS = 4000
ANSWER_TIMEOUT_MS = 4000
# A request ends by its send and answer timeouts plus the SDK's grace; anything slower hung.
ENDS_WITHIN = (SEND_TIMEOUT_MS + ANSWER_TIMEOUT_MS) / 1000 + 5


@dataclass
class Outcome:
    code: int
    seconds: float
    board: str = ""
    pid: int = 0
    at: float = 0.0


@dataclass
class Load:
    """Threads sending ``infer`` requests until stopped (bounded in count and time),
    recording how each one ended."""

    cluster: AICluster
    name: str
    threads: int = 4
    param: dict = field(default_factory=lambda: {"sleep": 0.02})
    max_requests: int = 20_000
    max_seconds: float = 90.0
    outcomes: list[Outcome] = field(default_factory=list)
    sent: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.threads)]

    def __enter__(self) -> "Load":
        self._deadline = time.monotonic() + self.max_seconds
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(ENDS_WITHIN + 5)
        assert not any(w.is_alive() for w in self._workers), "a request did not end"

    def _work(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                if self.sent >= self.max_requests:
                    return
                self.sent += 1
            started = time.monotonic()
            try:
                result, _ = self.cluster.infer(self.name, b"load", self.param)
                outcome = Outcome(0, time.monotonic() - started, result["board"], result["pid"], time.monotonic())
            except InfinibrainException as exc:
                outcome = Outcome(exc.code, time.monotonic() - started, at=time.monotonic())
                if exc.code == 111:
                    time.sleep(0.05)  # not connected: no point spinning
            with self._lock:
                self.outcomes.append(outcome)

    def codes(self) -> Counter:
        return Counter(o.code for o in self.outcomes)

    def served_since(self, moment: float) -> set[tuple[str, int]]:
        return {(o.board, o.pid) for o in list(self.outcomes) if o.code == 0 and o.at > moment}

    def check_all_ended(self, allowed: set[int]) -> None:
        """Every request sent ended, with a result or an allowed numbered error, in time."""
        assert len(self.outcomes) == self.sent
        unexpected = {c: n for c, n in self.codes().items() if c != 0 and c not in allowed}
        assert not unexpected, f"unexpected errors {unexpected} (all: {self.codes()})"
        slowest = max(o.seconds for o in self.outcomes)
        assert slowest < ENDS_WITHIN, f"a request took {slowest:.1f} s"


def events_of(cluster: AICluster) -> list[tuple]:
    events: list[tuple] = []
    cluster.set_callback(manage_callback=lambda code, msg, cmd, result: events.append((code, msg, cmd, result, time.monotonic())))
    return events


def rss(pid: int) -> int:
    """Resident bytes of process ``pid`` (Linux)."""
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def flood(port: int, keys: security.CurveKeys | None, inference: str, header_bytes: int = 0, count: int = 1) -> None:
    """A hostile client, with a valid key or none (run it in a process of its own): with
    ``header_bytes``, ``count`` requests whose headers are about that large; without,
    ``count`` requests to ``inference`` whose 300 kB results it never reads. Bounded in
    count; its connections close at the end."""
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUB)
    out.linger = 0
    out.sndhwm = 0
    security.arm_client(out, keys)
    out.connect(f"tcp://127.0.0.1:{port + P.INFER_IN}")
    cid = f"{os.getpid()}-flood"
    inbox = ctx.socket(zmq.SUB)  # subscribed, and never read (nor buffered here: what waits, waits in the manager)
    inbox.linger = 0
    inbox.rcvhwm = 1
    security.arm_client(inbox, keys)
    inbox.subscribe(P.client_topic(cid))
    inbox.connect(f"tcp://127.0.0.1:{port + P.CLIENT_OUT}")
    time.sleep(0.5)  # the flooder does not care whether its first messages arrive: time, not synchronisation
    if header_bytes:
        pad = list(range(header_bytes // 5))  # msgpack packs these ints in about 5 bytes each
        frames = [P.TOPIC_MANAGER, msgpack.packb({"v": P.VERSION, "k": P.REQUEST, "cid": cid, "param": {"pad": pad}})]
        for _ in range(count):
            out.send_multipart(frames)
    else:
        for i in range(count):
            P.send(out, P.encode(P.TOPIC_MANAGER, P.REQUEST, {"cid": cid, "pid": 1, "rid": str(i), "inf": inference,
                                                              "param": {"big": 300_000}, "arr": None}, [b"x"]))
            time.sleep(0.004)  # a steady stream, as fast as the model answers: time, not synchronisation
    time.sleep(3.0)  # keep the connections (and what the manager holds for them) a while, as a slow client does
    ctx.destroy(linger=0)
