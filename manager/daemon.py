"""``infinibrain-manager``: the cluster manager daemon, in the foreground.

It stops cleanly on SIGINT or SIGTERM: the loop ends, the containers it started (process
and Docker alike; not ``other``) are stopped, and the sockets close. The registry keeps
wanting them, so the next start brings them back. Killed with SIGKILL, it leaves its
containers running; the next start adopts them.

The main thread makes the parts and then runs the loop: it is the router thread; a signal stops it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

import zmq

from infinibrain import allocator

from . import __version__, init_command
from .auth import Guard
from .boards import close_boards, make_boards
from .changes import Changes
from .commands import Commands
from .config import ConfigError, ManagerConfig, exposed_listeners, is_loopback, load_config
from .deadlines import Deadlines
from .dispatch import Dispatcher
from .energy import Energy
from .figures import Figures, rss_bytes
from .group import Group
from .health import Health
from .loop import Loop
from .metrics import MetricsServer, NullMetrics, RequestMetrics
from .operations import Operations
from .payloads import Payloads
from .reconciler import Reconciler
from .registry import Registry
from .router import Clients, Router
from .state import RUNNING_STATES, Nudge
from .store import EtcdStore
from .telemetry import Telemetry
from .tracing import make_tracing
from .views import Views
from .wire import Wire

log = logging.getLogger("infinibrain.manager")

TRIM_EVERY = 5.0  # seconds
WRITE_AGAIN_EVERY = 2.0  # seconds between attempts to write what a group's etcd did not take
TRIM_GROWTH = 32 * 1024 * 1024  # bytes malloc holds free (or, without mallinfo2, resident size gained) before a trim


class Manager:
    """The daemon's parts, each given what it works with, in the order they depend on
    each other: the loop and the sockets; the request path (payloads, health, dispatcher);
    the control plane (reconciler, its workers, the registry, the boards); the command
    table; the router that feeds them all from the sockets; the metrics' listener."""

    def __init__(self, config: ManagerConfig, ctx: zmq.Context | None = None, group: Group | None = None) -> None:
        """``group``: this manager leads a manager group (group.py): its registry is in etcd,
        its loop and workers stop when the lead is lost, and it leaves its containers
        running when it stops (the next leader adopts them)."""
        ctx = ctx or zmq.Context.instance()
        self.group = group
        instance = uuid.uuid4().hex[:12]  # this run's identity ("mid"): clients notice a restart by it
        allocator.tune()  # message buffers reused, not mapped anew each time (infinibrain/allocator.py)
        self.config = config
        self.boards = make_boards(config)
        self.registry = Registry(config.state_dir, EtcdStore(group.writer(), group.writer()) if group else None)
        self.guard = Guard(config, ctx)
        self.loop = Loop(fence=group.leading if group else None)
        self.wire = Wire(config, self.guard, ctx, instance)
        self.payloads = Payloads(config.port, f"{os.getpid()}:{instance}")
        metrics = RequestMetrics() if config.metrics_port != -1 else NullMetrics()
        nudge = Nudge()
        clock = time.monotonic
        health = Health(config.liveness_timeout_ms / 1000, nudge, clock)
        clients: Clients = {}
        self.tracing = make_tracing(config.otlp_endpoint, config.trace_slow_ms, f"infinibrain-manager:{config.port}")
        self.dispatcher = Dispatcher(config, self.loop, self.wire, self.payloads, health, nudge, metrics, clock, clients,
                                     self.tracing)
        Deadlines(self.loop, self.wire, health, self.dispatcher)
        self.operations = Operations(fence=group.leading if group else None)
        self.reconciler = Reconciler(config, self.loop, self.wire, self.dispatcher, health, self.registry, self.boards,
                                     self.operations, self.guard, nudge, metrics, clock)
        self.telemetry = Telemetry(self.boards, config.telemetry_interval_ms / 1000)
        energy = Energy(self.loop, self.dispatcher, self.telemetry.watts, config.telemetry_interval_ms / 1000, clock)
        self.figures = Figures(config, self.loop, self.wire, self.dispatcher, self.payloads, self.guard, clients,
                               self.telemetry, energy, group.status if group else None)
        views = Views(self.dispatcher, self.reconciler, self.boards, config, self.operations)
        changes = Changes(self.reconciler, self.registry, self.dispatcher)
        commands = Commands(self.loop, self.wire, self.dispatcher, self.figures, self.reconciler, changes, views, self.boards,
                            self.operations, metrics, group.refusal if group else lambda: "")
        self.router = Router(config, self.loop, self.wire, self.guard, self.dispatcher, health, self.payloads, clients,
                             commands, self.reconciler.stranger, clock)
        self.metrics_server = None
        if isinstance(metrics, RequestMetrics):
            def page() -> dict:  # router thread: what the status page shows
                return {**self.figures.live(), "instance": self.wire.instance, "summary": metrics.summary(),
                        "recent": list(metrics.recent)}

            self.metrics_server = MetricsServer(metrics, lambda: self.loop.call(self.figures.live, timeout=5),
                                                lambda: self.loop.call(page, timeout=5), config.metrics_host,
                                                config.metrics_port)
        self._trimmed_rss = 0
        self.loop.every(self._trim, TRIM_EVERY)
        if group is not None:
            self.loop.every(self.registry.write_again, WRITE_AGAIN_EVERY)
        self.reconciler.restore()
        self.telemetry.start()

    def _trim(self, now: float) -> None:
        """After a burst of large messages (or a flood), give the kernel back what malloc
        keeps free (allocator.py keeps up to 128 MiB for speed) once that is more than
        TRIM_GROWTH, looked at every TRIM_EVERY seconds. Measured as what malloc holds free,
        not as resident size: a trim during the burst (memory still in use) must not keep
        the memory the burst frees afterwards from going back."""
        free = allocator.held_free()
        if free is not None:
            if free > TRIM_GROWTH:
                allocator.trim()
            return
        rss = rss_bytes()  # no mallinfo2: by resident size grown since the last trim
        if rss > self._trimmed_rss + TRIM_GROWTH:
            allocator.trim()
            self._trimmed_rss = rss_bytes()
        elif rss < self._trimmed_rss:
            self._trimmed_rss = rss

    def run(self) -> None:
        try:
            self.loop.run()
        finally:
            self.shutdown()

    def stop(self) -> None:
        """From any thread or a signal handler: the loop ends, then everything stops."""
        self.loop.stop()

    def shutdown(self) -> None:
        """Everything closed; the containers stopped, unless this manager led a group (the
        next leader adopts them)."""
        stoppers = [c for c in self.dispatcher.containers.values()
                    if c.running and c.state in RUNNING_STATES and c.runtime.kind != "other" and self.group is None]
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            for c, outcome in zip(stoppers, pool.map(_stop_quietly, stoppers)):
                if outcome:
                    log.warning("could not stop %s: %s", c.id, outcome)
        self.telemetry.close()
        self.tracing.close()
        if self.group is not None:  # what was asked is written while the term holds; then the lead is given up
            self.wire.close()  # before the workers finish: a standby leads at once
            self.registry.close()
            self.group.stop()
        self.operations.close()
        self.registry.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.group is None:
            self.wire.close()
        self.guard.close()
        self.payloads.close()
        self.loop.close()
        close_boards(self.boards)
        log.info("manager stopped")


def lead_or_stand_by(config: ManagerConfig) -> int:
    """A member of a manager group (group.py): stand by until it leads, lead until it
    loses the lead or is told to stop, and stand by again. On SIGINT/SIGTERM a leader
    resigns (a standby takes over at once) and leaves its containers running."""
    try:
        group = Group(config)
    except ImportError as exc:
        log.error("manager.etcd is set but etcd's client is missing (%s): pip install infinibrain[group]", exc)
        return 2
    stop = threading.Event()
    current: list[Manager] = []

    def stop_current() -> None:  # a signal, or the group's thread when the lead is lost
        for m in current:
            m.stop()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()
        stop_current()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    log.info("group member %s: etcd %s, prefix %s; standing by", group.id, config.etcd, config.etcd_prefix)
    while group.campaign(stop):
        group.start(lost=stop_current)  # the lease is renewed while the manager is made (adoption may take a while)
        try:
            manager = Manager(config, group=group)
        except Exception as exc:  # e.g. a deposed leader still holds our address, or etcd went away
            log.error("leading failed to start (%s: %s); the lead is given up and this manager exits (its supervisor "
                      "starts it again)", type(exc).__name__, exc)
            group.stop()
            return 1
        current.append(manager)
        if stop.is_set():
            manager.stop()  # a lead lost meanwhile ends the loop at its first wake (its fence)
        log.info("leading the group: state in etcd, boards: %s", ", ".join(manager.boards))
        manager.run()  # its shutdown gives the lead up once what it wrote is in etcd (Manager.shutdown)
        current.clear()
        if stop.is_set():
            break
        log.info("no longer leading: standing by")
    return 0


def _stop_quietly(c) -> str:
    try:
        c.runtime.stop(c.spec)
        return ""
    except Exception as exc:  # one board that cannot be reached must not keep the others running
        return str(exc)


class JSONFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def warn_exposure(config: ManagerConfig) -> None:
    """At every start: what faces a network without authentication, by the operator's choice."""
    if not config.curve:
        for key, address in exposed_listeners(config):
            log.warning("manager.%s = %s is not a loopback address and CURVE is off (allow_unauthenticated = true): "
                        "anyone who reaches %s can use these ports without a key", key, address, address)
    if config.metrics_port != -1 and not is_loopback(config.metrics_host):
        log.warning("metrics on %s:%d can be read by anyone who reaches that address (they need no key)",
                    config.metrics_host, config.metrics_port)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["init"]:  # a secure configuration in one step
        return init_command.main(argv[1:])
    parser = argparse.ArgumentParser(prog="infinibrain-manager", description="infinibrain cluster manager daemon",
                                     epilog="infinibrain-manager init --boards-network ADDRESS: write a configuration "
                                            "with CURVE on and its keys (init --help)")
    parser.add_argument("--config", help="TOML configuration file (default: one local board on 127.0.0.1:5570)")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"infinibrain-manager: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if config.log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])
    # The Docker SDK's HTTP requests (a poll every half second) would drown our own lines.
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warn_exposure(config)
    if config.etcd:
        return lead_or_stand_by(config)
    try:
        manager = Manager(config)
    except ConfigError as exc:  # found while making the boards, e.g. an unusable ssh_key
        log.error("%s", exc)
        return 2
    except zmq.ZMQError as exc:
        log.error("cannot bind %s:%d-%d or %s:%d-%d: %s", config.host, config.port, config.port + 2, config.board_host,
                  config.port + 3, config.port + 4, exc)
        return 1
    except OSError as exc:  # the metrics port
        log.error("cannot serve metrics on %s:%d: %s", config.metrics_host, config.metrics_port, exc)
        return 1

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        manager.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    log.info("state in %s; boards: %s", config.state_dir, ", ".join(manager.boards))
    manager.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
