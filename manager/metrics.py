"""Prometheus metrics: what the manager serves at ``http://<metrics_host>:<metrics_port>/metrics``.

Counters and histograms are updated where things happen (the router thread, the deployer's
workers); gauges (queue depth, in-flight, container up, dropped frames) are read from the
router's own state when a scrape comes, through ``Router.call`` so the scrape never reads
state the router thread is changing.

| metric | type | labels |
|---|---|---|
| infinibrain_requests_total | counter | inference, code (0 = result) |
| infinibrain_request_queue_wait_seconds | histogram | inference |
| infinibrain_request_seconds | histogram | inference (acceptance to answer) |
| infinibrain_queue_depth | gauge | inference |
| infinibrain_in_flight | gauge | inference, container, board |
| infinibrain_container_up | gauge | inference, container, board |
| infinibrain_deployment_seconds | histogram | inference, board |
| infinibrain_board_bytes_sent_total | counter | board (images and files sent to boards) |
| infinibrain_container_bytes_total | gauge | container, direction (request payload bytes moved) |
| infinibrain_dropped_frames_total | counter | port |
| infinibrain_refused_keys_total | counter | domain (CURVE) |
| infinibrain_clients | gauge | – |
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .router import Router
    from .state import Request

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DEPLOY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
UNKNOWN = ""  # the inference label of a request for an unregistered name (no unbounded labels)


class NullMetrics:
    """What the router calls when metrics are off: nothing happens."""

    def refused(self, inference: str, code: int) -> None:
        pass

    def dispatched(self, req: "Request") -> None:
        pass

    def ended(self, req: "Request", code: int) -> None:
        pass

    def deployed(self, inference: str, board: str, seconds: float) -> None:
        pass

    def sent_to_board(self, board: str, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


class Metrics(NullMetrics):
    def __init__(self, router: "Router", host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("infinibrain_requests", "Inference requests by inference and result code (0 = a result)",
                                ["inference", "code"], registry=self.registry)
        self.queue_wait = Histogram("infinibrain_request_queue_wait_seconds", "Time a request waited in the send-wait queue",
                                    ["inference"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.total = Histogram("infinibrain_request_seconds", "Time from a request's acceptance to its answer or error",
                               ["inference"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.deployments = Histogram("infinibrain_deployment_seconds", "Time to deploy and start a container",
                                     ["inference", "board"], buckets=DEPLOY_BUCKETS, registry=self.registry)
        self.board_bytes = Counter("infinibrain_board_bytes_sent", "Image and file bytes sent to boards",
                                   ["board"], registry=self.registry)
        self.registry.register(_Live(router))
        self.server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)

    def refused(self, inference: str, code: int) -> None:
        self.requests.labels(inference, str(code)).inc()

    def dispatched(self, req: "Request") -> None:
        self.queue_wait.labels(req.inference).observe(time.monotonic() - req.accepted)

    def ended(self, req: "Request", code: int) -> None:
        self.requests.labels(req.inference, str(code)).inc()
        self.total.labels(req.inference).observe(time.monotonic() - req.accepted)

    def deployed(self, inference: str, board: str, seconds: float) -> None:
        self.deployments.labels(inference, board).observe(seconds)

    def sent_to_board(self, board: str, nbytes: int) -> None:
        self.board_bytes.labels(board).inc(nbytes)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Live(Collector):
    """Gauges read from the router's state at scrape time."""

    def __init__(self, router: "Router") -> None:
        self.router = router

    def collect(self) -> Iterator[Any]:
        try:
            snap = self.router.call(self.router.live_figures, timeout=5)
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
        for c in snap["containers"]:
            key = [c["inference"], c["id"], c["board"]]
            flying.add_metric(key, c["in_flight"])
            up.add_metric(key, 1 if c["connected"] else 0)
            moved.add_metric([c["id"], "to"], c["tx_bytes"])
            moved.add_metric([c["id"], "from"], c["rx_bytes"])
        dropped = CounterMetricFamily("infinibrain_dropped_frames", "Malformed messages dropped, by manager port", labels=["port"])
        for port, n in snap["dropped_by_port"].items():
            dropped.add_metric([port], n)
        refused = CounterMetricFamily("infinibrain_refused_keys", "Connections refused by CURVE, by ZAP domain", labels=["domain"])
        for domain, n in snap["refused_keys"].items():
            refused.add_metric([domain], n)
        clients = GaugeMetricFamily("infinibrain_clients", "Clients the manager hears from")
        clients.add_metric([], snap["clients"])
        yield from (depth, flying, up, moved, dropped, refused, clients)
