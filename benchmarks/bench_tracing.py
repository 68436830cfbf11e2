"""The request path with tracing (issue 27): small requests to a Loop container, one at a
time, from an application without a current span (tracing off, as today), and with one
whose trace is sampled at 1% and at 100%, through a manager exporting to an OTLP/HTTP
receiver in this process; each case against a raw pyzmq round trip run in the same
process tree between them (the machine's noise), reported as ratios.

    .venv/bin/python benchmarks/bench_tracing.py [--requests 2000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import connected, running_manager  # noqa: E402
from test_tracing import Receiver  # noqa: E402

from infinibrain import ContainerConfig  # noqa: E402


def raw_round_trip(count: int) -> float:
    """Median µs of a REQ/REP round trip on loopback (the baseline)."""
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
        req.send(b"x" * 64)
        req.recv()
        times.append(time.perf_counter() - start)
    t.join(10)
    ctx.destroy(linger=0)
    return statistics.median(times) * 1e6


def timed(fn, count: int) -> float:
    """Median µs of ``fn()``, which returns the seconds of its own measured part."""
    times = []
    deadline = time.monotonic() + 60
    for _ in range(count):
        times.append(fn())
        if time.monotonic() > deadline:
            break
    return statistics.median(times) * 1e6


def infer_time(c) -> float:
    start = time.perf_counter()
    c.infer("loop", b"x" * 64)
    return time.perf_counter() - start


def main() -> int:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    receiver = Receiver()
    cases = {"off (no current span)": None, "sampled 1%": 0.01, "sampled 100%": 1.0}
    try:
        with tempfile.TemporaryDirectory() as folder, \
                running_manager(Path(folder), boards=("local",), log_level="WARNING", metrics_port=-1,
                                otlp_endpoint=receiver.url, telemetry_interval_ms=0) as m, connected(m) as c:
            c.load_inference(ContainerConfig(name="loop", implementation_type="Loop", input="Main", output="Main"), "local")
            for _ in range(200):
                c.infer("loop", b"x" * 64)
            for label, ratio in cases.items():
                base = raw_round_trip(args.requests)
                if ratio is None:
                    took = timed(lambda: infer_time(c), args.requests)
                else:
                    tracer = TracerProvider(sampler=TraceIdRatioBased(ratio)).get_tracer("bench")

                    def one() -> float:  # the application's own span is not the request path's cost
                        with tracer.start_as_current_span("request"):
                            return infer_time(c)

                    took = timed(one, args.requests)
                print(f"{label}: {took:.0f} µs per request (median of {args.requests}), raw pyzmq round trip {base:.0f} µs: "
                      f"x{took / base:.2f}")
            print(f"spans received: {len(receiver.spans)}")
    finally:
        receiver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
