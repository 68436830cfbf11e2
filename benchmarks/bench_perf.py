"""Requests through infinibrain against the ZeroMQ guide's load-balancing broker, one table.

Both sides run the same model (``{"mean": image.mean()}``) in two worker processes:

- **broker**: the guide's load-balancing broker (lbbroker: ROUTER to the clients, ROUTER to
  the workers, workers announce credit), two DEALER workers with 2 credits each, every
  payload frame zero-copy; the client is a DEALER.
- **infinibrain**: a manager with two local boards, one ``process`` replica of
  benchmarks/models/mean.py on each, ``max_send_num=2``; the SDK's ``infer_image`` one at a
  time, and ``infer_image_future`` with WINDOW in flight.

For 224x224x3 and 1920x1080x3 uint8 images: p50 of one request at a time, and requests and
MB per second with WINDOW in flight; then the ratios (ours / broker). Each figure is the
median of ``--rounds`` alternating rounds.

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python benchmarks/bench_perf.py'

Every loop is bounded in count and in time.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import msgpack
import numpy as np
import zmq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import ManagerProcess, free_base_port  # noqa: E402

from infinibrain import AICluster, ContainerConfig, InferenceModulesConfig  # noqa: E402

PAYLOADS = {"224x224x3": (224, 224, 3), "1920x1080x3": (1080, 1920, 3)}
WINDOW = 16
CREDITS = 2


# ---- the guide's load-balancing broker -------------------------------------------------------


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


class Broker:
    def __init__(self, stop_after: float) -> None:
        port = free_base_port(2)
        self.procs = [mp.Process(target=lb_broker, args=(port, port + 1, stop_after), daemon=True)]
        self.procs += [mp.Process(target=lb_worker, args=(port + 1, stop_after), daemon=True) for _ in range(2)]
        for p in self.procs:
            p.start()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        time.sleep(0.5)

    def send(self, image: np.ndarray) -> None:
        self.sock.send_multipart([msgpack.packb({"shape": list(image.shape), "dtype": image.dtype.str}), image], copy=False)

    def one(self, image: np.ndarray) -> dict:
        self.send(image)
        return msgpack.unpackb(self.sock.recv_multipart(copy=False)[1].bytes)

    def throughput(self, image: np.ndarray, count: int, seconds: float) -> float:
        sent = done = 0
        deadline = time.monotonic() + seconds
        started = time.perf_counter()
        while done < count and time.monotonic() < deadline:
            while sent - done < WINDOW and sent < count:
                self.send(image)
                sent += 1
            if self.sock.poll(1000):
                self.sock.recv_multipart(copy=False)
                done += 1
        while done < sent and self.sock.poll(2000):
            self.sock.recv_multipart(copy=False)
            done += 1
        return done / (time.perf_counter() - started)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        for p in self.procs:
            p.terminate()
            p.join(5)


# ---- infinibrain -------------------------------------------------------------------------------


def ours_throughput(cluster: AICluster, name: str, image: np.ndarray, count: int, seconds: float) -> float:
    """``infer_image_future`` with WINDOW in flight."""
    slots = threading.Semaphore(WINDOW)
    done = [0]
    errors: list[BaseException] = []

    def finished(f: Future) -> None:
        if f.exception() is not None:
            errors.append(f.exception())
        done[0] += 1
        slots.release()

    sent = 0
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    while sent < count and time.monotonic() < deadline:
        if not slots.acquire(timeout=10):
            break
        cluster.infer_image_future(name, image).add_done_callback(finished)
        sent += 1
    end = time.monotonic() + 30
    while done[0] < sent and time.monotonic() < end:
        time.sleep(0.0005)
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return done[0] / (time.perf_counter() - started)


def p50_ms(call, image: np.ndarray, count: int, seconds: float) -> float:
    for _ in range(min(50, count)):
        call(image)
    samples = []
    deadline = time.monotonic() + seconds
    while len(samples) < count and time.monotonic() < deadline:
        t0 = time.perf_counter()
        call(image)
        samples.append(time.perf_counter() - t0)
    return float(np.percentile(np.array(samples) * 1000, 50))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    out: dict = {"window": WINDOW}
    with tempfile.TemporaryDirectory(prefix="ib-bench-perf-") as folder:
        m = ManagerProcess(Path(folder), boards=("local", "b2"), log_level="WARNING", metrics_port=-1).start()
        broker = Broker(stop_after=3600)
        try:
            with AICluster(port=m.port) as c:
                c.load_inference(ContainerConfig(name="mean", implementation_type="process", input="Main", output="Main",
                                                 script_path=str(HERE / "models"), max_send_num=CREDITS,
                                                 inference_modules=InferenceModulesConfig(sub_inference_name="mean",
                                                                                          script="mean.py")), "all")
                for label, shape in PAYLOADS.items():
                    image = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
                    image.setflags(write=False)  # a caller that does not reuse its buffer: no copy (issue 13)
                    count = args.requests if shape[0] < 1000 else max(args.requests // 10, 100)
                    assert abs(c.infer_image("mean", image)["mean"] - broker.one(image)["mean"]) < 1e-6
                    figures: dict[str, list[float]] = {k: [] for k in ("broker_p50", "ours_p50", "broker_rps", "ours_rps")}
                    for _ in range(args.rounds):
                        figures["broker_p50"].append(p50_ms(broker.one, image, count, args.seconds))
                        figures["ours_p50"].append(p50_ms(lambda im: c.infer_image("mean", im), image, count, args.seconds))
                        figures["broker_rps"].append(broker.throughput(image, count, args.seconds))
                        figures["ours_rps"].append(ours_throughput(c, "mean", image, count, args.seconds))
                    row = {k: statistics.median(v) for k, v in figures.items()}
                    mb = image.nbytes / 1e6
                    row.update(broker_MBs=row["broker_rps"] * mb, ours_MBs=row["ours_rps"] * mb,
                               p50_ratio=row["ours_p50"] / row["broker_p50"], rps_ratio=row["ours_rps"] / row["broker_rps"])
                    out[label] = {k: round(v, 3) for k, v in row.items()}
                c.unload_inference("mean")
        finally:
            broker.close()
            m.stop()
            m.cleanup()
    print(f"{'payload':>12} {'':12} {'p50 ms':>8} {'req/s':>9} {'MB/s':>9}")
    for label in PAYLOADS:
        r = out[label]
        print(f"{label:>12} {'broker':12} {r['broker_p50']:8.3f} {r['broker_rps']:9.1f} {r['broker_MBs']:9.1f}")
        print(f"{'':>12} {'infinibrain':12} {r['ours_p50']:8.3f} {r['ours_rps']:9.1f} {r['ours_MBs']:9.1f}")
        print(f"{'':>12} {'ratio':12} {'x%.2f' % r['p50_ratio']:>8} {'x%.2f' % r['rps_ratio']:>9} {'x%.2f' % r['rps_ratio']:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    mp.set_start_method("fork")
    sys.exit(main())
