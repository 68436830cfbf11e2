"""Prometheus metrics: what the manager serves at ``http://<metrics_host>:<metrics_port>/metrics``.

Counters and histograms (``RequestMetrics``) are updated where things happen, on the
router thread; gauges (queue depth, in-flight, container up, dropped frames) are read from
the router's own state when a scrape comes (``serve``'s ``live``, which asks the router
thread through ``Loop.call``), so a scrape never reads state the router thread is changing.
The HTTP server runs on a thread of its own.

| metric | type | labels |
|---|---|---|
| infinibrain_requests_total | counter | inference, code (0 = result) |
| infinibrain_request_retries_total | counter | inference (requests sent again because their container went away) |
| infinibrain_request_queue_wait_seconds | histogram | inference |
| infinibrain_request_seconds | histogram | inference (acceptance to answer) |
| infinibrain_queue_depth | gauge | inference |
| infinibrain_in_flight | gauge | inference, container, board |
| infinibrain_container_up | gauge | inference, container, board |
| infinibrain_container_state | gauge | inference, container, board, state (1 for its current state) |
| infinibrain_deployment_seconds | histogram | inference, board (containers that became ready) |
| infinibrain_deployments_total | counter | inference, board, outcome (ready, failed) |
| infinibrain_board_bytes_sent_total | counter | board (images and files sent to boards) |
| infinibrain_container_bytes_total | gauge | container, direction (request payload bytes moved) |
| infinibrain_dropped_frames_total | counter | port |
| infinibrain_refused_keys_total | counter | domain (CURVE) |
| infinibrain_clients | gauge | – |
| infinibrain_loop_errors_total | counter | where (the router went on after an exception there) |
| infinibrain_board_up, infinibrain_board_cpu_utilization_ratio, ..._memory_used_bytes, ..._memory_total_bytes, ..._load1, ..._temperature_celsius, ..._gpu_utilization_ratio, ..._emc_utilization_ratio, ..._power_watts, ..._power_average_watts, ..._input_power_watts | gauge | board (+ cpu, sensor, rail): board telemetry (telemetry.py) |
| infinibrain_inference_energy_joules_per_request | gauge | inference, board (energy.py) |
| infinibrain_group_leader, infinibrain_group_leader_transitions_total, infinibrain_group_quorum, infinibrain_group_members, infinibrain_group_lease_age_seconds | gauge, counter | – (a manager group only: group.py) |

``/`` on the same listener is a status page (status_page.py) for people.
"""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server
from typing import TYPE_CHECKING, Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .status_page import render

if TYPE_CHECKING:
    from .state import Request

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DEPLOY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
UNKNOWN = ""  # the inference label of a request for an unregistered name (no unbounded labels)
RECENT = 20  # errors the status page lists


class NullMetrics:
    """What the router calls when metrics are off: nothing happens."""

    def refused(self, inference: str, code: int) -> None:
        pass

    def dispatched(self, req: "Request") -> None:
        pass

    def ended(self, req: "Request", code: int) -> None:
        pass

    def retried(self, req: "Request") -> None:
        pass

    def deployed(self, inference: str, board: str, seconds: float, outcome: str) -> None:
        pass

    def sent_to_board(self, board: str, nbytes: int) -> None:
        pass


class RequestMetrics(NullMetrics):
    """The counters and histograms, updated on the router thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("infinibrain_requests", "Inference requests by inference and result code (0 = a result)",
                                ["inference", "code"], registry=self.registry)
        self.queue_wait = Histogram("infinibrain_request_queue_wait_seconds", "Time a request waited in the send-wait queue",
                                    ["inference"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.total = Histogram("infinibrain_request_seconds", "Time from a request's acceptance to its answer or error",
                               ["inference"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.deployments = Histogram("infinibrain_deployment_seconds", "Time to deploy a container until it is ready",
                                     ["inference", "board"], buckets=DEPLOY_BUCKETS, registry=self.registry)
        self.outcomes = Counter("infinibrain_deployments", "Containers deployed (or restarted), by outcome: ready or failed",
                                ["inference", "board", "outcome"], registry=self.registry)
        self.board_bytes = Counter("infinibrain_board_bytes_sent", "Image and file bytes sent to boards",
                                   ["board"], registry=self.registry)
        self.retries = Counter("infinibrain_request_retries", "Requests sent again because their container went away",
                               ["inference"], registry=self.registry)
        self._children: dict[tuple, Any] = {}  # (metric, *labels) -> its labelled child
        self.recent: collections.deque[dict] = collections.deque(maxlen=RECENT)  # the last errors, for the status page

    def _error(self, what: str, inference: str, code: int | str, board: str = "") -> None:
        self.recent.appendleft({"at": time.strftime("%H:%M:%S"), "what": what, "inference": inference, "board": board,
                                "code": code})

    def summary(self) -> dict[str, dict]:
        """Per inference: requests ended, how many with an error, mean seconds to the answer
        (for the status page; router thread)."""
        out: dict[str, dict] = collections.defaultdict(lambda: {"requests": 0, "errors": 0, "mean_seconds": None})
        for family in self.requests.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    row = out[s.labels["inference"]]
                    row["requests"] += int(s.value)
                    if s.labels["code"] != "0":
                        row["errors"] += int(s.value)
        sums: dict[str, float] = {}
        for family in self.total.collect():
            for s in family.samples:
                if s.name.endswith("_sum"):
                    sums[s.labels["inference"]] = s.value
                elif s.name.endswith("_count") and s.value:
                    out[s.labels["inference"]]["count"] = s.value
        for name, row in out.items():
            if row.get("count"):
                row["mean_seconds"] = sums.get(name, 0.0) / row.pop("count")
        return dict(out)

    # The request path calls these for every request: a labelled child is looked up once
    # per metric and labels and kept, not through ``labels()`` each time.

    def _child(self, metric: Any, *labels: str) -> Any:
        child = self._children.get((metric, *labels))
        if child is None:
            child = self._children[(metric, *labels)] = metric.labels(*labels)
        return child

    def refused(self, inference: str, code: int) -> None:
        self._child(self.requests, inference, str(code)).inc()
        self._error("request refused", inference, code)

    def dispatched(self, req: "Request") -> None:
        self._child(self.queue_wait, req.inference).observe(time.monotonic() - req.accepted)

    def ended(self, req: "Request", code: int) -> None:
        self._child(self.requests, req.inference, str(code)).inc()
        self._child(self.total, req.inference).observe(time.monotonic() - req.accepted)
        if code:
            self._error("request", req.inference, code, req.container or "")

    def retried(self, req: "Request") -> None:
        self._child(self.retries, req.inference).inc()

    def deployed(self, inference: str, board: str, seconds: float, outcome: str) -> None:
        self.outcomes.labels(inference, board, outcome).inc()
        if outcome == "ready":
            self.deployments.labels(inference, board).observe(seconds)
        else:
            self._error("deployment", inference, outcome, board)

    def sent_to_board(self, board: str, nbytes: int) -> None:
        self.board_bytes.labels(board).inc(nbytes)


class MetricsServer:
    """The HTTP listener of ``metrics``, with the gauges ``live()`` gives at each scrape, and
    the status page at ``/`` (status_page.py) from ``page()``. Its own threads (one per
    request); what they read comes from the router thread through ``Loop.call``."""

    def __init__(self, metrics: RequestMetrics, live: Callable[[], dict], page: Callable[[], dict], host: str,
                 port: int) -> None:
        metrics.registry.register(_Live(live))
        scrape = make_wsgi_app(metrics.registry)

        def app(environ: dict, start_response: Callable) -> list[bytes]:
            if environ.get("PATH_INFO") in ("/", "/index.html"):
                try:
                    body = render(page()).encode()
                    status = "200 OK"
                except Exception as exc:  # the router is stopping: say so
                    body, status = f"the manager is not answering: {exc}".encode(), "503 Service Unavailable"
                start_response(status, [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")])
                return [body]
            if environ.get("PATH_INFO") == "/metrics":
                return scrape(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: / is the status page, /metrics the metrics"]

        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("_Server", (ThreadingWSGIServer,), {"address_family": family})  # ::1 as well as 127.0.0.1
        self.server: ThreadingWSGIServer = make_server(host, port, app, server_class, handler_class=_Quiet)
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics, the status page on http://%s:%d/", host, port, host, port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class _Live(Collector):
    """Gauges read from the router's state at scrape time."""

    def __init__(self, live: Callable[[], dict]) -> None:
        self.live = live

    def collect(self) -> Iterator[Any]:
        try:
            snap = self.live()
        except Exception as exc:  # the router is stopping: serve what we have
            log.debug("metrics snapshot failed: %s", exc)
            return
        depth = GaugeMetricFamily("infinibrain_queue_depth", "Requests waiting in the send-wait queue", labels=["inference"])
        for name, n in snap["queues"].items():
            depth.add_metric([name], n)
        flying = GaugeMetricFamily("infinibrain_in_flight", "Requests sent to a container and not yet answered",
                                   labels=["inference", "container", "board"])
        up = GaugeMetricFamily("infinibrain_container_up", "1 if the container is connected", labels=["inference", "container", "board"])
        moved = GaugeMetricFamily("infinibrain_container_bytes", "Request and result payload bytes moved to and from a container",
                                  labels=["container", "direction"])
        state = GaugeMetricFamily("infinibrain_container_state", "1 for the state each container is in",
                                  labels=["inference", "container", "board", "state"])
        for c in per_container(snap["containers"]):
            key = [c["inference"], c["suffix"], c["board"]]
            flying.add_metric(key, c["in_flight"])
            up.add_metric(key, 1 if c["connected"] else 0)
            state.add_metric([*key, c["state"]], 1)
            moved.add_metric([c["suffix"], "to"], c["tx_bytes"])
            moved.add_metric([c["suffix"], "from"], c["rx_bytes"])
        dropped = CounterMetricFamily("infinibrain_dropped_frames", "Malformed messages dropped, by manager port", labels=["port"])
        for port, n in snap["dropped_by_port"].items():
            dropped.add_metric([port], n)
        refused = CounterMetricFamily("infinibrain_refused_keys", "Connections refused by CURVE, by ZAP domain", labels=["domain"])
        for domain, n in snap["refused_keys"].items():
            refused.add_metric([domain], n)
        clients = GaugeMetricFamily("infinibrain_clients", "Clients the manager hears from")
        clients.add_metric([], snap["clients"])
        errors = CounterMetricFamily("infinibrain_loop_errors", "Exceptions the router logged and went on after, by where",
                                     labels=["where"])
        for where, n in snap["loop_errors"].items():
            errors.add_metric([where], n)
        yield from (depth, flying, up, state, moved, dropped, refused, clients, errors)
        yield from board_families(snap.get("boards") or {}, snap.get("energy") or [])
        if snap.get("group"):
            yield from group_families(snap["group"])


def group_families(group: dict) -> list[Any]:
    """A manager group's figures, as this manager sees them (group.py)."""
    leader = GaugeMetricFamily("infinibrain_group_leader", "1 while this manager leads its group")
    leader.add_metric([], 1 if group.get("role") == "leader" else 0)
    transitions = CounterMetricFamily("infinibrain_group_leader_transitions", "Times the group's lead changed hands (etcd)")
    transitions.add_metric([], group.get("transitions") or 0)
    quorum = GaugeMetricFamily("infinibrain_group_quorum", "1 while the group's etcd takes changes")
    quorum.add_metric([], 0 if group.get("changes", "accepted") != "accepted" else 1)
    members = GaugeMetricFamily("infinibrain_group_members", "Managers of the group holding a lease (leader and standbys)")
    members.add_metric([], len(group.get("members") or []))
    age = GaugeMetricFamily("infinibrain_group_lease_age_seconds", "Seconds since the leader's lease was last renewed")
    age.add_metric([], group.get("lease_age_s") or 0.0)
    return [leader, transitions, quorum, members, age]


def board_families(boards: dict[str, dict], energy: list[dict]) -> list[Any]:
    """The ``infinibrain_board_*`` gauges (telemetry.py): base units (ratios 0..1, bytes,
    degrees Celsius, watts), a ``board`` label on each; a board whose sampler is silent has
    only ``infinibrain_board_up 0``. And ``infinibrain_inference_energy_joules_per_request``."""
    def gauge(name: str, text: str, *labels: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, text, labels=["board", *labels])

    up = gauge("infinibrain_board_up", "1 while the board's telemetry sampler answers")
    cpu = gauge("infinibrain_board_cpu_utilization_ratio", "Busy share of each CPU (cpu=\"all\": the whole board), 0..1", "cpu")
    used = gauge("infinibrain_board_memory_used_bytes", "Memory in use (MemTotal - MemAvailable)")
    total = gauge("infinibrain_board_memory_total_bytes", "Memory in all")
    load = gauge("infinibrain_board_load1", "Load average over 1 minute")
    temp = gauge("infinibrain_board_temperature_celsius", "Temperature of each sensor (thermal zones; tegra_*: tegrastats)", "sensor")
    gpu = gauge("infinibrain_board_gpu_utilization_ratio", "GPU (GR3D) load from tegrastats, 0..1")
    emc = gauge("infinibrain_board_emc_utilization_ratio", "External memory controller load from tegrastats, 0..1")
    rail = gauge("infinibrain_board_power_watts", "Power of each rail from tegrastats, now", "rail")
    rail_avg = gauge("infinibrain_board_power_average_watts", "Power of each rail from tegrastats, averaged by tegrastats", "rail")
    watts = gauge("infinibrain_board_input_power_watts", "The board's input power (its input rail, else the sum of its rails)")
    for name, b in boards.items():
        up.add_metric([name], 1 if b["state"] == "ok" else 0)
        if b["state"] != "ok":
            continue
        for core, ratio in b["cpu"].items():
            cpu.add_metric([name, core], ratio)
        used.add_metric([name], b["memory_used"])
        total.add_metric([name], b["memory_total"])
        load.add_metric([name], b["load"][0])
        for sensor, degrees in b["temperatures"].items():
            temp.add_metric([name, sensor], degrees)
        for family, key in ((gpu, "gpu"), (emc, "emc"), (watts, "watts")):
            if b[key] is not None:
                family.add_metric([name], b[key])
        for r, figures in b["rails"].items():
            rail.add_metric([name, r], figures["watts"])
            rail_avg.add_metric([name, r], figures["average_watts"])
    joules = GaugeMetricFamily("infinibrain_inference_energy_joules_per_request",
                               "Estimated energy of one request of the inference on the board (energy.py)", labels=["inference", "board"])
    for e in energy:
        joules.add_metric([e["inference"], e["board"]], e["joules_per_request"])
    return [up, cpu, used, total, load, temp, gpu, emc, rail, rail_avg, watts, joules]


def per_container(instances: list[dict]) -> list[dict]:
    """One row per container (placement): a rolling update runs two instances of one for a
    while; their figures add up, and the state shown is the newest instance's."""
    rows: dict[str, dict] = {}
    for c in sorted(instances, key=lambda c: c["revision"]):
        row = rows.get(c["suffix"])
        if row is None:
            rows[c["suffix"]] = dict(c)
            continue
        row.update(in_flight=row["in_flight"] + c["in_flight"], connected=row["connected"] or c["connected"],
                   tx_bytes=row["tx_bytes"] + c["tx_bytes"], rx_bytes=row["rx_bytes"] + c["rx_bytes"], state=c["state"])
    return list(rows.values())
