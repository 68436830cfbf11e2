"""Board telemetry: what each board is doing, with no agent installed on it.

One sampler per machine (board_stats.SAMPLER, a shell loop; boards on one machine share
it and its reading): on this machine a child process of the manager, on an ssh board one
long-lived command on the board's existing SSH connection (not a command per sample).
Each sampler has a reader thread of its own that
turns the sampler's output into a ``Reading`` (CPU per core and in all, memory, load,
temperatures; on a Jetson GPU and EMC load and each power rail from tegrastats). A sampler
that ends or says nothing for ``STALE`` intervals makes the board "silent": its figures
are dropped, never shown stale; it is started again after a pause (at most one attempt
per ``RETRY`` seconds).

Threads: one reader per machine writes; ``readings()`` (the router thread: commands, the
metrics) reads through ``_lock``, the one door; ``watts()`` (the router thread's energy
timer) reads one attribute of one reading without it (a float, replaced whole).
"""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Iterator

from .board_stats import Block, Tegra, cpu_busy, parse_block, parse_tegrastats, sampler
from .boards import Board

log = logging.getLogger(__name__)

STALE = 3  # intervals without a block: the board is silent
RETRY = 5.0  # seconds between attempts to start a board's sampler


@dataclass
class Reading:
    """A board's figures as the last sample gave them (JSON-ready with ``as_dict``)."""

    state: str = "starting"  # "ok", "starting", "silent"
    why: str = ""  # what made it silent
    at: float = 0.0  # monotonic time of the last block
    samples: int = 0
    sampler_starts: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # "all", "0", "1", ...: busy share 0..1
    memory_used: int = 0  # bytes
    memory_total: int = 0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    temperatures: dict[str, float] = field(default_factory=dict)  # sensor -> degrees Celsius
    jetson: bool = False  # tegrastats answers
    gpu: float | None = None  # GR3D load 0..1
    emc: float | None = None
    rails: dict[str, tuple[float, float]] = field(default_factory=dict)  # rail -> (current W, average W)
    watts: float | None = None  # the board's input power (board_stats.Tegra.board_watts)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("at")
        out["rails"] = {k: {"watts": v[0], "average_watts": v[1]} for k, v in self.rails.items()}
        if self.state != "ok":  # never stale figures
            for key in ("cpu", "temperatures", "rails"):
                out[key] = {}
            for key in ("memory_used", "memory_total", "gpu", "emc", "watts"):
                out[key] = None
            out["load"] = None
        return out


class Telemetry:
    def __init__(self, boards: dict[str, Board], interval: float, clock: Any = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        # One sampler per machine: boards that share one (local boards: this machine) share
        # its reading, and /proc is read once for them.
        self._host_of = {name: board.host_key for name, board in boards.items()}
        self._sampled_through = {board.host_key: board for board in boards.values()}  # a board reaching each machine
        self._lock = threading.Lock()
        self._readings = {host: Reading() for host in self._sampled_through}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._streams: dict[str, Any] = {}  # machine -> what to close to end its sampler

    def start(self) -> None:
        if self.interval <= 0:
            return
        for host, board in self._sampled_through.items():
            t = threading.Thread(target=self._run, args=(host, board), name=f"telemetry-{board.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            _end(stream)
        for t in self._threads:
            t.join(2)

    # ---- reading (any thread) --------------------------------------------------------------

    def readings(self) -> dict[str, dict]:
        """Every board's reading (``Reading.as_dict``); one whose sampler fell silent has no figures."""
        now = self.clock()
        with self._lock:
            for r in self._readings.values():
                if r.state == "ok" and not self._fresh(r, now):
                    r.state, r.why = "silent", f"no sample for {now - r.at:.1f} s"
            machines = {host: r.as_dict() for host, r in self._readings.items()}
        return {name: machines[host] for name, host in self._host_of.items()}

    def watts(self, board: str) -> float | None:
        """The board's input power now, where it reports one (the request path asks)."""
        r = self._readings.get(self._host_of.get(board, ""))
        return r.watts if r is not None and r.state == "ok" and self._fresh(r, self.clock()) else None

    def _fresh(self, r: Reading, now: float) -> bool:
        return now - r.at <= STALE * self.interval

    # ---- a machine's reader thread -------------------------------------------------------------

    def _run(self, host: str, board: Board) -> None:
        while not self._stop.is_set():
            started = self.clock()
            try:
                stream, lines = self._open(board)
                with self._lock:
                    self._streams[host] = stream
                    self._readings[host].sampler_starts += 1
                why = self._follow(self._readings[host], lines)
            except Exception as exc:  # a board that cannot be reached: said, and tried again later
                why = f"sampler cannot start: {exc}"
            finally:
                with self._lock:
                    stream = self._streams.pop(host, None)
                if stream is not None:
                    _end(stream)
            if self._stop.is_set():
                return
            with self._lock:
                r = self._readings[host]
                r.state, r.why = "silent", why
            log.info("board %s: telemetry %s", board.name, why)
            self._stop.wait(max(RETRY - (self.clock() - started), 0.5))

    def _open(self, board: Board) -> tuple[Any, Iterator[str]]:
        script = sampler(self.interval)
        patience = max(STALE * self.interval * 2, 5.0)  # a sampler silent this long is ended and started again
        if board.link is None:
            proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            assert proc.stdout is not None
            return proc, _fd_lines(proc.stdout.fileno(), patience)
        channel = board.link.stream(script, timeout=patience)
        return channel, _lines(channel.makefile("r"))

    def _follow(self, r: Reading, lines: Iterator[str]) -> str:
        """Read blocks into ``r`` until the sampler ends; why it ended."""
        block: list[str] | None = None
        previous: Block | None = None
        tegra_at = 0.0
        for line in lines:
            if self._stop.is_set():
                return "stopped"
            if line.startswith("tegra "):
                tegra = parse_tegrastats(line[6:])
                tegra_at = self.clock()
                with self._lock:
                    _apply_tegra(r, tegra)
            elif line.startswith("@sample"):
                block = []
            elif line.startswith("@end") and block is not None:
                current = parse_block(block)
                block = None
                with self._lock:
                    _apply_block(r, current, previous, self.clock())
                    if r.jetson and self.clock() - tegra_at > STALE * self.interval:
                        r.jetson, r.gpu, r.emc, r.rails, r.watts = False, None, None, {}, None
                previous = current
            elif block is not None:
                block.append(line)
        return "sampler ended"


def _apply_block(r: Reading, current: Block, previous: Block | None, now: float) -> None:
    r.state, r.why, r.at = "ok", "", now
    r.samples += 1
    if previous is not None:
        r.cpu = cpu_busy(previous, current)
    r.memory_total = current.memory_total
    r.memory_used = max(current.memory_total - current.memory_available, 0)
    r.load = current.load
    r.temperatures = {**current.temperatures, **{k: v for k, v in r.temperatures.items() if k.startswith("tegra_")}}


def _apply_tegra(r: Reading, t: Tegra) -> None:
    r.jetson = True
    r.gpu, r.emc, r.rails, r.watts = t.gpu, t.emc, t.rails, t.board_watts
    for sensor, degrees in t.temperatures.items():
        r.temperatures[f"tegra_{sensor}"] = degrees


def _lines(fh: IO) -> Iterator[str]:
    for line in fh:
        yield line.rstrip("\n")


def _fd_lines(fd: int, patience: float) -> Iterator[str]:
    """A local sampler's lines; TimeoutError after ``patience`` seconds with nothing (a hung
    sampler is then ended and started again, not waited for)."""
    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], patience)
        if not ready:
            raise TimeoutError(f"the sampler printed nothing for {patience:g} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line.decode(errors="replace")


def _end(stream: Any) -> None:
    """End a sampler: the local process group, or the SSH channel (the remote loop dies of SIGPIPE)."""
    try:
        if isinstance(stream, subprocess.Popen):
            if stream.poll() is None:  # not reaped yet: its pid (and group) is still its own
                os.killpg(stream.pid, signal.SIGKILL)  # a shell loop: nothing to clean up, and a stopped one ends too
            stream.wait(5)
            if stream.stdout is not None:
                stream.stdout.close()
        else:
            stream.close()
    except (OSError, subprocess.TimeoutExpired):
        pass
