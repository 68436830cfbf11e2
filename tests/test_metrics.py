"""The manager's Prometheus metrics, scraped after real traffic: the numbers add up."""
from __future__ import annotations

import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import connect_raw, echo_config, send_until, wait_for
from infinibrain import protocol as P
from infinibrain.errors import InfinibrainException


def scrape(m) -> dict[tuple, float]:
    """Every sample as {(name, (label, value), ...): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{m.port + 5}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, *sorted(labels.items())), 0.0)


def test_metrics_add_up_after_real_traffic(fresh_manager, name, tmp_path):
    m = fresh_manager(send_queue_size=5).start()
    c = m.client()
    c.load_inference(echo_config(name, send_timeout=500), "all")
    for _ in range(30):
        c.infer(name, b"abcd")
    # Errors of several kinds: 305 (queue full), 306 (no container took it), 400 (unknown).
    for h in c.get_container_handler(name):
        h.stop_distribution()
    outcomes: list[int] = []
    lock = threading.Lock()

    def record(code, *rest):
        with lock:
            outcomes.append(code)

    for _ in range(8):
        c.infer_async(name, b"x", func=record)
    wait_for(lambda: len(outcomes) == 8, timeout=10)
    with pytest.raises(InfinibrainException):
        c.infer("no-such-inference", b"x")
    source = tmp_path / "weights.bin"
    source.write_bytes(b"w" * 12345)
    for h in c.get_container_handler(name):
        h.start_distribution()
    c.put_file(name, {"file": str(source)})
    # No wait: the router counted every figure below before it answered put_file (and the
    # gauges are read from its state when the scrape comes).

    s = scrape(m)
    assert value(s, "infinibrain_requests_total", inference=name, code="0") == 30
    assert value(s, "infinibrain_requests_total", inference=name, code="305") == outcomes.count(305) == 3
    assert value(s, "infinibrain_requests_total", inference=name, code="306") == outcomes.count(306) == 5
    assert value(s, "infinibrain_requests_total", inference="", code="400") == 1  # no label per unknown name
    # Every accepted request is in the latency histogram once; the 30 served waited in the queue once.
    assert value(s, "infinibrain_request_seconds_count", inference=name) == 35
    assert value(s, "infinibrain_request_queue_wait_seconds_count", inference=name) == 30
    assert 0 < value(s, "infinibrain_request_seconds_sum", inference=name) < 35 * 1.0
    # Containers: both up, nothing in flight, nothing queued; payload bytes add up (30 x 4 bytes).
    for board in ("local", "b2"):
        labels = {"inference": name, "container": f"{name}-{board}", "board": board}
        assert value(s, "infinibrain_container_up", **labels) == 1
        assert value(s, "infinibrain_in_flight", **labels) == 0
    assert sum(value(s, "infinibrain_container_bytes", container=f"{name}-{b}", direction="to") for b in ("local", "b2")) == 30 * 4
    assert value(s, "infinibrain_queue_depth", inference=name) == 0
    # Two deployments, and the file sent to both boards.
    assert value(s, "infinibrain_deployment_seconds_count", inference=name, board="local") == 1
    assert value(s, "infinibrain_deployment_seconds_count", inference=name, board="b2") == 1
    assert value(s, "infinibrain_board_bytes_sent_total", board="local") == 12345
    assert value(s, "infinibrain_clients") >= 1

    # A container going away shows as down; malformed frames are counted by port.
    import os
    import signal

    import zmq

    pid = next(r["pid"] for r in (c.infer(name, b"x")[0] for _ in range(4)) if r["board"] == "b2")
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    ctx = zmq.Context()
    try:
        pub = ctx.socket(zmq.PUB)
        connect_raw(pub, f"tcp://127.0.0.1:{m.port}")
        # A request for no inference is refused and counted (400), not dropped: sent until
        # the manager has counted one, it shows the connection is up; sent after the seven,
        # that they were read (the messages of one connection are read in order).
        probe = P.encode(P.TOPIC_MANAGER, P.REQUEST, {"cid": "probe", "pid": 1, "rid": "probe", "inf": "no-such-inference"})

        def refused() -> float:
            return value(scrape(m), "infinibrain_requests_total", inference="", code="400")

        before = refused()
        send_until(lambda: P.send(pub, probe), lambda: refused() > before)
        for _ in range(7):
            pub.send_multipart([b"m", b"not msgpack \xc1"])
        before = refused()
        P.send(pub, probe)
        wait_for(lambda: refused() > before)
    finally:
        ctx.destroy(linger=0)
    wait_for(lambda: value(scrape(m), "infinibrain_container_up", inference=name, container=f"{name}-b2", board="b2") == 0)
    s = scrape(m)
    assert value(s, "infinibrain_dropped_frames_total", port="requests") == 7
    c.unload_inference(name)
    c.release()
