"""The request path with tracing (issue 27): small requests to a Loop container, one at a
time, median, through two managers side by side: one as today (no ``otlp_endpoint``) and
one exporting to an OTLP/HTTP receiver in this process. Each traced case is measured
against the same application today: with no current span (tracing off), and with its
own spans sampled at 1% and at 100%, where today's SDK sent no ``traceparent`` (emulated:
the SDK's ``current_traceparent`` answers None, as before tracing existed), so the
application's own span work weighs on both sides alike. The cases run in alternating
rounds, in a new order each round (a drift of the machine weighs on all alike); each
figure is the median of the rounds' medians. A raw pyzmq round trip, for scale.

    .venv/bin/python benchmarks/bench_tracing.py [--requests 2000] [--rounds 5]

``make bench-perf`` runs it as its ``tracing`` section.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import zmq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import ManagerProcess  # noqa: E402
from table import Row, print_table, rounds_of  # noqa: E402

from infinibrain import ContainerConfig, _client  # noqa: E402
from infinibrain.tracing import current_traceparent  # noqa: E402

PAYLOAD = b"x" * 64


def raw_round_trip(count: int) -> float:
    """Median µs of a REQ/REP round trip on loopback (for scale)."""
    ctx = zmq.Context()
    rep, req = ctx.socket(zmq.REP), ctx.socket(zmq.REQ)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    req.connect(f"tcp://127.0.0.1:{port}")

    def serve() -> None:
        for _ in range(count):
            rep.send(rep.recv())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        req.send(PAYLOAD)
        req.recv()
        times.append(time.perf_counter() - start)
    t.join(10)
    ctx.destroy(linger=0)
    return statistics.median(times) * 1e6


def median_us(one: Callable[[], float], count: int, seconds: float) -> float:
    """Median µs of ``one()``, which returns the seconds of its own measured part."""
    times = []
    deadline = time.monotonic() + seconds
    for _ in range(count):
        times.append(one())
        if time.monotonic() > deadline:
            break
    return statistics.median(times) * 1e6


def small_request(c) -> Callable[[], float]:
    """One small request to the ``loop`` inference through ``c``: its seconds."""
    def one() -> float:
        start = time.perf_counter()
        c.infer("loop", PAYLOAD)
        return time.perf_counter() - start
    return one


def tracing_section(args: argparse.Namespace) -> list[Row]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    from test_tracing import Receiver

    receiver = Receiver()
    spans_before = 0
    with tempfile.TemporaryDirectory(prefix="ib-bench-tracing-") as folder:
        managers = {"today": ManagerProcess(Path(folder) / "today", boards=("local",), log_level="WARNING", metrics_port=-1,
                                            telemetry_interval_ms=0),
                    "traced": ManagerProcess(Path(folder) / "traced", boards=("local",), log_level="WARNING", metrics_port=-1,
                                             telemetry_interval_ms=0, otlp_endpoint=receiver.url)}
        try:
            for m in managers.values():
                m.start()
            with managers["today"].client() as today, managers["traced"].client() as traced:
                for c in (today, traced):
                    c.load_inference(ContainerConfig(name="loop", implementation_type="Loop", input="Main", output="Main"), "local")
                    for _ in range(200):
                        c.infer("loop", PAYLOAD)

                def sampled(ratio: float, c, sends: bool = True) -> Callable[[], float]:
                    tracer = TracerProvider(sampler=TraceIdRatioBased(ratio)).get_tracer("bench")
                    timed = small_request(c)

                    def one() -> float:  # the application's own span is not the request path's cost
                        with tracer.start_as_current_span("request"):
                            if sends:
                                return timed()
                            _client.current_traceparent = lambda: None  # today's SDK: no traceparent
                            try:
                                return timed()
                            finally:
                                _client.current_traceparent = current_traceparent
                    return one

                cases = {"today": small_request(today), "off": small_request(traced), "today, 1% spans": sampled(0.01, today, False),
                         "1%": sampled(0.01, traced), "today, 100% spans": sampled(1.0, today, False),
                         "100%": sampled(1.0, traced)}
                figures = rounds_of(args.rounds, {k: (lambda one=one: median_us(one, args.requests, args.seconds))
                                                  for k, one in cases.items()}, rotate=True)
                spans_before = len(receiver.spans)
                for c in (today, traced):
                    c.unload_inference("")
        finally:
            for m in managers.values():
                m.stop()
                m.cleanup()
            receiver.close()
    base = raw_round_trip(args.requests)
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(f"tracing: rounds (µs) {', '.join(f'{k} {[round(x) for x in v]}' for k, v in figures.items())}; "
          f"raw pyzmq round trip {base:.0f} µs; spans received {spans_before}")
    return [
        Row("tracing", "p50 small request, tracing off", med["off"], med["today"], "today (no endpoint)", "<= 1.01", "us"),
        Row("tracing", "p50 small request, 1% sampled", med["1%"], med["today, 1% spans"], "today, same spans", "<= 1.03", "us"),
        Row("tracing", "p50 small request, 100% sampled", med["100%"], med["today, 100% spans"], "today, same spans", "", "us"),
        Row("tracing", "p50 small request, today", med["today"], base, "raw pyzmq REQ/REP", "", "us"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30.0, help="bound on each measurement")
    print_table(tracing_section(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
