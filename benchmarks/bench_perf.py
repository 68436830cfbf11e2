"""infinibrain's request path, measured against baselines in the same run: one table.

1. **Small and large requests against a raw broker.** Both sides run the same model
   (``{"mean": image.mean()}``, benchmarks/models/mean.py) in two worker processes:
   the ZeroMQ guide's load-balancing broker (lbbroker: ROUTER to the clients, ROUTER to
   the workers, two DEALER workers with 2 credits each, payload frames zero-copy, a
   DEALER client) against a manager with two local boards, one ``process`` replica on
   each, ``max_send_num=2``. For 224x224x3 and 1920x1080x3 uint8 images: p50 of one
   request at a time (``infer_image``), requests and MB per second with WINDOW in flight
   (``infer_image_future``, and ``infer_image_async`` with a callback). The images travel
   in shared memory (infinibrain/shm.py), as they do whenever client, manager and
   container share a host; for information, the same with a client that sends frames
   (as from another host) is measured too. For information,
   the same work in infinibrain's topology with raw pyzmq (a pub/sub forwarder: client
   PUB/SUB, XPUB to SUB workers, their PUB back), against the broker: what the pub/sub
   sockets themselves cost. The baselines' processes start as fresh interpreters
   (multiprocessing's "spawn"), as the manager and its containers do; the same broker
   forked from this process is measured too, for information: forked processes share
   this one's memory and run markedly faster under load (docs/BENCHMARKS.md).
2. **Dynamic batching** (benchmarks/models/batched.py: about 3 ms per call plus a little
   per image) with ``max_batch_size=16`` against the same model unbatched, at 16 and 64
   in flight: requests per second and p99.
3. **Scaling** (benchmarks/models/busy.py: 5 ms of CPU per request): one replica against
   two, WINDOW in flight; and 8 client processes at once, each with 4 in flight: the
   slowest client's requests per second against the fastest's.
4. **Size**: manager CPU per request and p50 with 2 containers and with ``--containers``
   (default 200, ``Loop`` containers idle beside the model's two): two managers side by
   side, measured in alternating rounds; the manager's memory per idle container.
5. **Tracing** (benchmarks/bench_tracing.py): small requests with tracing off, sampled at
   1% and at 100%, against a manager as today (no ``otlp_endpoint``).
6. **Group** (benchmarks/bench_group.py): small requests through a manager group's leader
   against a single manager (the takeover itself: ``bench_group.py``).

Each figure of 1 and 2 is the median of ``--rounds`` alternating rounds.

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python benchmarks/bench_perf.py'

``--only raw,batching,scaling,size,tracing,group`` runs some sections. Every loop is bounded in count
and in time.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_control import cpu_seconds  # noqa: E402
from bench_infer import Baseline, Finish, latency, throughput_baseline, windowed  # noqa: E402
from conftest import ManagerProcess, free_base_port  # noqa: E402
from bench_group import group_section  # noqa: E402
from bench_tracing import tracing_section  # noqa: E402
from table import Row, median_rounds, print_table  # noqa: E402

from infinibrain import AICluster, ContainerConfig, InferenceModulesConfig, allocator, shm  # noqa: E402

PAYLOADS = {"224x224x3": (224, 224, 3), "1920x1080x3": (1080, 1920, 3)}
WINDOW = 16
# The baselines' processes start as fresh interpreters, as the manager and its containers
# do: a process forked from this one costs measurably less CPU per request than the same
# program started anew (docs/BENCHMARKS.md), which would favour the baseline.
FRESH = mp.get_context("spawn")
CREDITS = 2


# ---- the guide's load-balancing broker -------------------------------------------------------


def tuned(target: Callable[..., None], *args: Any) -> None:
    """Run a baseline process's ``target`` with glibc's malloc tuned as infinibrain's own
    processes tune it (infinibrain/allocator.py): the baselines get every advantage ours have."""
    allocator.tune()
    target(*args)


def lb_broker(front: int, back: int, stop_after: float) -> None:
    ctx = zmq.Context()
    frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    frontend.bind(f"tcp://127.0.0.1:{front}")
    backend.bind(f"tcp://127.0.0.1:{back}")
    credits: list[bytes] = []  # one entry per request a worker can take
    workers_only, both = zmq.Poller(), zmq.Poller()  # clients are heard only while a worker has credit
    workers_only.register(backend, zmq.POLLIN)
    both.register(backend, zmq.POLLIN)
    both.register(frontend, zmq.POLLIN)
    deadline = time.monotonic() + stop_after
    while time.monotonic() < deadline:
        for sock, _ in (both if credits else workers_only).poll(100):
            if sock is backend:
                frames = backend.recv_multipart(copy=False)
                worker = frames[0].bytes
                credits.append(worker)
                if len(frames) > 2:  # an answer: [worker, client, header, result]
                    frontend.send_multipart(frames[1:], copy=False)
            elif credits:
                frames = frontend.recv_multipart(copy=False)  # [client, header, payload]
                backend.send_multipart([credits.pop(0), *frames], copy=False)


def lb_worker(back: int, stop_after: float) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{back}")
    for _ in range(CREDITS):
        s.send(b"READY")
    deadline = time.monotonic() + stop_after
    while time.monotonic() < deadline:
        if not s.poll(100):
            continue
        client, header, payload = s.recv_multipart(copy=False)
        meta = msgpack.unpackb(header.bytes)
        image = np.frombuffer(payload.buffer, dtype=meta["dtype"]).reshape(meta["shape"])
        s.send_multipart([client, header, msgpack.packb({"mean": float(image.mean())})], copy=False)


def wait_ready(baseline: Baseline, seconds: float = 60.0) -> None:
    """Until a request is answered: fresh interpreters take a while to start, and pub/sub
    drops what is sent before the subscriptions have arrived. Answers to earlier tries
    are drained."""
    probe = np.zeros((2, 2), np.uint8)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        baseline.send(probe, -1)
        if baseline.sock.poll(500):
            while baseline.sock.poll(300):
                baseline.recv()
            return
    raise RuntimeError(f"{type(baseline).__name__} did not answer within {seconds:g} s")


class Broker(Baseline):
    """The guide's load-balancing broker and two workers; the client side is bench_infer's."""

    def __init__(self, stop_after: float, start: Any = FRESH) -> None:  # noqa: super().__init__ starts other processes
        port = free_base_port(2)
        self.procs = [start.Process(target=tuned, args=(lb_broker, port, port + 1, stop_after), daemon=True)]
        self.procs += [start.Process(target=tuned, args=(lb_worker, port + 1, stop_after), daemon=True) for _ in range(2)]
        for p in self.procs:
            p.start()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        wait_ready(self)

    def throughput(self, image: np.ndarray, count: int, seconds: float) -> float:
        return throughput_baseline(self, image, count, seconds, WINDOW)["req_s"]


# ---- the same in infinibrain's topology, raw: is pub/sub the cost? -----------------------------


def ps_forwarder(base: int, stop_after: float) -> None:
    """The manager's sockets with none of its work: client PUB -> SUB, XPUB -> worker SUB,
    worker PUB -> SUB, PUB -> client SUB; CREDITS per worker, first come first served."""
    ctx = zmq.Context()

    def sock(kind: int, offset: int) -> zmq.Socket:
        s = ctx.socket(kind)
        if kind == zmq.SUB:
            s.subscribe(b"")
        s.bind(f"tcp://127.0.0.1:{base + offset}")
        return s

    requests, to_client, to_workers, results = sock(zmq.SUB, 0), sock(zmq.PUB, 1), sock(zmq.XPUB, 2), sock(zmq.SUB, 3)
    credits: list[bytes] = []
    waiting: list[list] = []
    poller = zmq.Poller()
    for s in (requests, results, to_workers):
        poller.register(s, zmq.POLLIN)
    deadline = time.monotonic() + stop_after
    while time.monotonic() < deadline:
        for s, _ in poller.poll(100):
            if s is to_workers:  # a worker subscribed: its credits
                event = to_workers.recv()
                if event[:1] == b"\x01":
                    credits += [event[1:]] * CREDITS
                continue
            for _ in range(256):
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if s is requests:  # [client topic, header, image]
                    waiting.append(frames)
                else:  # [worker topic, client topic, header, result]
                    credits.append(frames[0].bytes)
                    to_client.send_multipart(frames[1:], copy=False)
        while waiting and credits:
            to_workers.send_multipart([credits.pop(0), *waiting.pop(0)], copy=False)


def ps_worker(base: int, name: bytes, stop_after: float) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.subscribe(name)
    s.connect(f"tcp://127.0.0.1:{base + 2}")
    p = ctx.socket(zmq.PUB)
    p.connect(f"tcp://127.0.0.1:{base + 3}")
    deadline = time.monotonic() + stop_after
    while time.monotonic() < deadline:
        if not s.poll(100):
            continue
        _, client, header, payload = s.recv_multipart(copy=False)
        meta = msgpack.unpackb(header.bytes)
        image = np.frombuffer(payload.buffer, dtype=meta["dtype"]).reshape(meta["shape"])
        p.send_multipart([name, client, header, msgpack.packb({"mean": float(image.mean())})], copy=False)


class PubSubForwarder(Baseline):
    """``ps_forwarder`` and two workers; the client a PUB and a SUB socket."""

    def __init__(self, stop_after: float) -> None:  # noqa: super().__init__ starts other processes
        base = free_base_port(4)
        self.procs = [FRESH.Process(target=tuned, args=(ps_forwarder, base, stop_after), daemon=True)]
        self.procs += [FRESH.Process(target=tuned, args=(ps_worker, base, name, stop_after), daemon=True) for name in (b"w1", b"w2")]
        for p in self.procs:
            p.start()
        self.ctx = zmq.Context()
        self.out = self.ctx.socket(zmq.PUB)
        self.out.connect(f"tcp://127.0.0.1:{base}")
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.subscribe(b"me")
        self.sock.connect(f"tcp://127.0.0.1:{base + 1}")
        wait_ready(self)

    def send(self, image: np.ndarray, n: int) -> None:
        self.out.send_multipart([b"me", msgpack.packb({"n": n, "shape": list(image.shape), "dtype": image.dtype.str}), image],
                                copy=False)

    def throughput(self, image: np.ndarray, count: int, seconds: float) -> float:
        return throughput_baseline(self, image, count, seconds, WINDOW)["req_s"]

    def close(self) -> None:
        self.out.close(linger=0)
        super().close()


# ---- measuring ---------------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def by_future(cluster: AICluster, name: str, image: np.ndarray) -> Callable[[Finish], Any]:
    return lambda finished: cluster.infer_image_future(name, image).add_done_callback(lambda f: finished(f.exception()))


def by_callback(cluster: AICluster, name: str, image: np.ndarray) -> Callable[[Finish], Any]:
    def start(finished: Finish) -> None:
        cluster.infer_image_async(name, image, {}, lambda code, message, result, response:
                                  finished(None if code == 0 else RuntimeError(f"[{code}] {message}")))
    return start


def p50_ms(call: Callable[[np.ndarray], Any], image: np.ndarray, count: int, seconds: float) -> float:
    return latency(call, image, count, seconds)["p50_ms"]


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.array(latencies) * 1000, q))


def image_of(shape: tuple[int, ...]) -> np.ndarray:
    image = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
    image.setflags(write=False)  # a caller that does not reuse its buffer: no copy (issue 13)
    return image


# ---- the cluster -------------------------------------------------------------------------------


def model_config(name: str, script: str, **kw: Any) -> ContainerConfig:
    settings: dict[str, Any] = dict(name=name, implementation_type="process", input="Main", output="Main",
                                    script_path=str(HERE / "models"), max_send_num=CREDITS,
                                    inference_modules=InferenceModulesConfig(sub_inference_name=name, script=script))
    settings.update(kw)
    return ContainerConfig(**settings)


# ---- 1. against the raw broker -----------------------------------------------------------------


def frames_only_client(port: int) -> AICluster:
    """A client that sends every payload in frames, as one with INFINIBRAIN_SHM_BYTES=0 (or
    on another host) does: what shared memory is worth (docs/DECISIONS.md)."""
    saved, shm.LIMIT_BYTES = shm.LIMIT_BYTES, 0
    try:
        return AICluster(port=port)
    finally:
        shm.LIMIT_BYTES = saved


def raw_section(c: AICluster, framed: AICluster, args: argparse.Namespace) -> list[Row]:
    broker = Broker(stop_after=3600)
    forked = Broker(stop_after=3600, start=mp.get_context("fork"))  # for information: what forking is worth
    pubsub = PubSubForwarder(stop_after=3600)
    rows: list[Row] = []
    try:
        c.load_inference(model_config("mean", "mean.py"), "all")
        for label, shape in PAYLOADS.items():
            image = image_of(shape)
            small = shape[0] < 1000
            count = args.requests if small else max(args.requests // 10, 100)
            assert abs(c.infer_image("mean", image)["mean"] - broker.one(image)["mean"]) < 1e-6
            f = median_rounds(args.rounds, {
                "broker_p50": lambda: p50_ms(broker.one, image, count, args.seconds),
                "ours_p50": lambda: p50_ms(lambda im: c.infer_image("mean", im), image, count, args.seconds),
                "broker_rps": lambda: broker.throughput(image, count, args.seconds),
                "ours_rps": lambda: windowed(by_future(c, "mean", image), count, args.seconds, WINDOW)[0],
                "ours_async_rps": lambda: windowed(by_callback(c, "mean", image), count, args.seconds, WINDOW)[0],
                "framed_rps": lambda: windowed(by_future(framed, "mean", image), count, args.seconds, WINDOW)[0],
                **({"pubsub_rps": lambda: pubsub.throughput(image, count, args.seconds),
                    "forked_rps": lambda: forked.throughput(image, count, args.seconds)} if small else {}),
            })
            mb = image.nbytes / 1e6
            rows.append(Row("raw", f"{label} p50, one at a time", f["ours_p50"], f["broker_p50"], "lbbroker",
                            "<= 1.3" if small else "", "ms"))
            if small:
                rows.append(Row("raw", f"{label} req/s, {WINDOW} in flight (future)", f["ours_rps"], f["broker_rps"], "lbbroker",
                                ">= 0.8"))
                rows.append(Row("raw", f"{label} req/s, {WINDOW} in flight (_async)", f["ours_async_rps"], f["broker_rps"],
                                "lbbroker", ">= 0.8"))
                rows.append(Row("raw", f"{label} req/s, future, frames only (no shm)", f["framed_rps"], f["broker_rps"],
                                "lbbroker", ""))
                rows.append(Row("raw", f"{label} req/s, raw pub/sub forwarder (our topology)", f["pubsub_rps"],
                                f["broker_rps"], "lbbroker", ""))
                rows.append(Row("raw", f"{label} req/s, lbbroker forked from this process", f["forked_rps"], f["broker_rps"],
                                "lbbroker", ""))
            else:
                rows.append(Row("raw", f"{label} MB/s, {WINDOW} in flight (future)", f["ours_rps"] * mb, f["broker_rps"] * mb,
                                "lbbroker", ">= 1.0"))
                rows.append(Row("raw", f"{label} MB/s, {WINDOW} in flight (_async)", f["ours_async_rps"] * mb,
                                f["broker_rps"] * mb, "lbbroker", ">= 1.0"))
                rows.append(Row("raw", f"{label} MB/s, future, frames only (no shm)", f["framed_rps"] * mb,
                                f["broker_rps"] * mb, "lbbroker", ""))
        c.unload_inference("mean")
    finally:
        broker.close()
        forked.close()
        pubsub.close()
    return rows


# ---- 2. dynamic batching -----------------------------------------------------------------------


def batching_section(c: AICluster, args: argparse.Namespace) -> list[Row]:
    c.load_inference(model_config("plain", "batched.py"), "all")
    c.load_inference(model_config("batched", "batched.py", max_batch_size=16, max_send_num=1, max_queue_delay=3), "all")
    image = image_of(PAYLOADS["224x224x3"])
    assert c.infer_image("plain", image) == c.infer_image("batched", image)  # the same model both ways
    rows: list[Row] = []
    count = max(args.requests // 2, 200)
    for window in (16, 64):
        runs: dict[str, list[tuple[float, list[float]]]] = {"plain": [], "batched": []}
        for _ in range(args.rounds):
            for name in runs:
                runs[name].append(windowed(by_future(c, name, image), count, args.seconds, window))
        rps = {n: statistics.median(r for r, _ in v) for n, v in runs.items()}
        p99 = {n: statistics.median(percentile_ms(lat, 99) for _, lat in v) for n, v in runs.items()}
        rows.append(Row("batching", f"req/s, {window} in flight", rps["batched"], rps["plain"], "unbatched", ">= 3"))
        rows.append(Row("batching", f"p99, {window} in flight", p99["batched"], p99["plain"], "unbatched", "<= 2", "ms"))
    c.unload_inference("plain")
    c.unload_inference("batched")
    return rows


# ---- 3. scaling --------------------------------------------------------------------------------


def client_process(port: int, name: str, seconds: float, start_at: float, out: Any) -> None:
    """One of several client processes: requests per second with 4 in flight, started at
    ``start_at`` (all together) for ``seconds``."""
    image = image_of(PAYLOADS["224x224x3"])
    with AICluster(port=port) as cluster:
        cluster.infer_image(name, image)
        time.sleep(max(0.0, start_at - time.time()))
        rps, _ = windowed(by_future(cluster, name, image), 1_000_000, seconds, 4)
    out.put(rps)


def scaling_section(c: AICluster, port: int, args: argparse.Namespace) -> list[Row]:
    image = image_of(PAYLOADS["224x224x3"])
    count = max(args.requests // 4, 200)
    c.load_inference(model_config("busy", "busy.py"), "local")
    one = windowed(by_future(c, "busy", image), count, args.seconds, WINDOW)[0]
    c.load_inference(model_config("busy", "busy.py"), "b2")
    two = windowed(by_future(c, "busy", image), count, args.seconds, WINDOW)[0]
    rows = [Row("scaling", "req/s, 5 ms model, 2 replicas vs 1", two, one, "1 replica", ">= 1.6")]
    results: mp.Queue = mp.Queue()
    start_at = time.time() + 3
    clients = [mp.Process(target=client_process, args=(port, "busy", args.fair_seconds, start_at, results)) for _ in range(8)]
    for p in clients:
        p.start()
    per_client = [results.get(timeout=args.fair_seconds + 60) for _ in clients]
    for p in clients:
        p.join(10)
    rows.append(Row("scaling", "8 clients: slowest vs fastest client's req/s", min(per_client), max(per_client), "fastest",
                    ">= 0.5"))
    c.unload_inference("busy")
    return rows


# ---- 4. size -----------------------------------------------------------------------------------


def size_section(args: argparse.Namespace) -> list[Row]:
    """Manager CPU per request and p50 with ``--containers`` registered against 2: two
    managers side by side, one with the model's 2 containers, one with as many ``Loop``
    containers idle beside them, measured in alternating rounds (a drift of the machine
    then weighs on both alike); and, for information, the larger one before its idle
    containers were loaded, as a sequential measure sees it."""
    with tempfile.TemporaryDirectory(prefix="ib-bench-size-") as folder:
        managers = {k: ManagerProcess(Path(folder) / k, boards=("local", "b2"), log_level="WARNING", metrics_port=-1)
                    for k in ("few", "many")}
        try:
            for m in managers.values():
                m.start()
            with managers["few"].client() as few_c, managers["many"].client() as many_c:
                clients = {"few": few_c, "many": many_c}
                image = image_of(PAYLOADS["224x224x3"])
                for c in clients.values():
                    c.load_inference(model_config("mean", "mean.py"), "all")

                def measure(key: str) -> tuple[float, float]:
                    c, pid = clients[key], managers[key].proc.pid
                    p50 = p50_ms(lambda im: c.infer_image("mean", im), image, args.requests // 2, args.seconds)
                    before = cpu_seconds(pid)  # in clock ticks (10 ms): enough requests that one tick is little
                    _, latencies = windowed(by_future(c, "mean", image), 2 * args.requests, args.seconds, WINDOW)
                    return p50, 1e6 * (cpu_seconds(pid) - before) / len(latencies)

                before_loading = median_pairs([measure("many") for _ in range(args.rounds)])
                rss_few = rss_bytes(managers["many"].proc.pid)
                extra = max(args.containers - 2, 0)
                t0 = time.monotonic()
                for first in range(0, extra // 2, 10):
                    futures = [many_c.load_inference_future(ContainerConfig(name=f"idle{i}", implementation_type="Loop"), "all")
                               for i in range(first, min(first + 10, extra // 2))]
                    for f in futures:
                        f.result(timeout=600)
                loaded = time.monotonic() - t0
                time.sleep(2)  # their first heartbeats and pings settle
                rss_many = rss_bytes(managers["many"].proc.pid)
                rounds: dict[str, list[tuple[float, float]]] = {"few": [], "many": []}
                for _ in range(args.rounds):
                    for key in rounds:
                        rounds[key].append(measure(key))
                few, many = median_pairs(rounds["few"]), median_pairs(rounds["many"])
                for c in clients.values():
                    c.unload_inference("")
        finally:
            for m in managers.values():
                m.stop()
                m.cleanup()
    n = 2 + 2 * (extra // 2)
    per_container_kb = (rss_many - rss_few) / max(n - 2, 1) / 1024
    return [
        Row("size", f"manager CPU per request, {n} vs 2 containers", many[1], few[1], "2 containers", "<= 1.2", "us"),
        Row("size", f"224x224x3 p50, {n} vs 2 containers", many[0], few[0], "2 containers", "<= 1.2", "ms"),
        Row("size", f"manager CPU per request, {n} vs before loading them", many[1], before_loading[1], "same, earlier", "", "us"),
        Row("size", "manager memory per idle container", per_container_kb, 0.0, f"({loaded:.0f} s to load)", "", "kB"),
    ]


def median_pairs(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)


# ---- main ----------------------------------------------------------------------------------------

SECTIONS = ("raw", "batching", "scaling", "size", "tracing", "group")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0, help="bound on each measurement")
    ap.add_argument("--fair-seconds", type=float, default=10.0, help="how long the 8 clients run")
    ap.add_argument("--containers", type=int, default=200)
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections to run: " + ", ".join(SECTIONS))
    ap.add_argument("--json")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ib-bench-perf-") as folder:
        m = ManagerProcess(Path(folder), boards=("local", "b2"), log_level="WARNING", metrics_port=-1).start()
        try:
            with AICluster(port=m.port) as c:
                if "raw" in only:
                    with frames_only_client(m.port) as framed:
                        rows += raw_section(c, framed, args)
                if "batching" in only:
                    rows += batching_section(c, args)
                if "scaling" in only:
                    rows += scaling_section(c, m.port, args)
        finally:
            m.stop()
            m.cleanup()
    if "size" in only:
        rows += size_section(args)
    if "tracing" in only:
        rows += tracing_section(argparse.Namespace(requests=args.requests // 2, rounds=max(args.rounds, 5), seconds=args.seconds))
    if "group" in only:
        rows += group_section(argparse.Namespace(requests=args.requests // 2, rounds_path=max(args.rounds, 6),
                                                 seconds=args.seconds))
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([dict(asdict(r), ratio=r.ratio, holds=r.holds) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    mp.set_start_method("fork")
    sys.exit(main())
