"""infer_image through the manager against a raw pyzmq two-hop baseline, same payloads.

Baseline: client DEALER -> broker (a Python poll loop, ROUTER in / DEALER out) -> worker
DEALER, and back; every payload frame zero-copy, the worker answers a small msgpack map,
exactly what our ``Loop`` container answers. Ours: AICluster -> manager -> ``Loop``
container (a process), and back. With ``--docker``, also the same loopback module in a
Docker container (``infinibrain/runtime``, host network; ``make images`` first). All run
here, on 127.0.0.1, one after the other, with the same images. For each payload it reports
p50/p99 latency of one request at a time and the throughput with WINDOW requests in
flight, then the ratios to the baseline (and docker / process). With ``--ssh``, also a
``Loop`` container on an emulated SSH board (scripts/boards.py: a real sshd on 127.0.0.2;
the container was deployed over SSH, requests do not go through it), against the local one.
With ``--curve``, also a second manager with CURVE on every socket (a client with an allowed
key, the container with the key the manager hands it), against the plain one. With
``--arm64``, also the loopback module in an arm64 container under qemu-user-static
(``infinibrain/runtime:arm64``), for information: emulation is slow, a real board is not.

    python benchmarks/bench_infer.py [--requests N] [--seconds S] [--docker] [--ssh] [--curve] [--json PATH]

Every loop is bounded in count and in time. (A Docker container on the host network
lives in the engine's network namespace, so ``--docker`` cannot run under ``unshare -n``;
``--ssh`` can.)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import msgpack
import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import ManagerProcess, SSHBoards  # noqa: E402  (the same real-manager harness as the tests)

from infinibrain import AICluster, ContainerConfig  # noqa: E402

PAYLOADS = {"224x224x3": (224, 224, 3), "1920x1080x3": (1080, 1920, 3)}
WINDOW = 8


# ---- the baseline ---------------------------------------------------------------------


def _curve_server(sock: zmq.Socket, keys: dict | None) -> None:
    if keys:
        sock.curve_server, sock.curve_secretkey = True, keys["server_secret"]


def _curve_client(sock: zmq.Socket, keys: dict | None) -> None:
    if keys:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys["server_public"], keys["public"], keys["secret"]


def baseline_broker(front: int, back: int, stop_after: float, keys: dict | None = None) -> None:
    ctx = zmq.Context()
    fe, be = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    _curve_server(fe, keys)
    _curve_server(be, keys)
    fe.bind(f"tcp://127.0.0.1:{front}")
    be.bind(f"tcp://127.0.0.1:{back}")
    poller = zmq.Poller()
    poller.register(fe, zmq.POLLIN)
    poller.register(be, zmq.POLLIN)
    deadline = time.monotonic() + stop_after
    while time.monotonic() < deadline:
        for sock, _ in poller.poll(100):
            frames = sock.recv_multipart(copy=False)
            (be if sock is fe else fe).send_multipart(frames, copy=False)


def baseline_worker(back: int, stop_after: float, keys: dict | None = None) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    _curve_client(s, keys)
    s.connect(f"tcp://127.0.0.1:{back}")
    deadline = time.monotonic() + stop_after
    while time.monotonic() < deadline:
        if not s.poll(100):
            continue
        frames = s.recv_multipart(copy=False)
        ident, header, payload = frames[0], msgpack.unpackb(frames[1].bytes), frames[2]
        answer = {"bytes": len(payload), "shape": header["shape"], "dtype": header["dtype"], "param": {}, "sub_inference_name": "x"}
        s.send_multipart([ident, frames[1], msgpack.packb(answer)], copy=False)


class Baseline:
    """Raw pyzmq, two hops; with ``curve`` every hop is CURVE-encrypted, as ours then is
    (plain ZeroMQ CURVE, no ZAP: the cost of the encryption alone)."""

    def __init__(self, port: int, stop_after: float, curve: bool = False) -> None:
        keys = None
        if curve:
            server_public, server_secret = zmq.curve_keypair()
            public, secret = zmq.curve_keypair()
            keys = {"server_public": server_public, "server_secret": server_secret, "public": public, "secret": secret}
        self.procs = [
            mp.Process(target=baseline_broker, args=(port, port + 1, stop_after, keys), daemon=True),
            mp.Process(target=baseline_worker, args=(port + 1, stop_after, keys), daemon=True),
        ]
        for p in self.procs:
            p.start()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        _curve_client(self.sock, keys)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        time.sleep(0.5)

    def send(self, image: np.ndarray, n: int) -> None:
        header = msgpack.packb({"n": n, "shape": list(image.shape), "dtype": image.dtype.str})
        self.sock.send_multipart([header, image], copy=False)

    def recv(self) -> dict:
        frames = self.sock.recv_multipart(copy=False)
        return msgpack.unpackb(frames[1].bytes)

    def one(self, image: np.ndarray) -> dict:
        self.send(image, 0)
        return self.recv()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        for p in self.procs:
            p.terminate()
            p.join(5)


def curve_manager(tmp: Path) -> tuple[ManagerProcess, AICluster]:
    """A second manager with CURVE on, a client with an allowed key, and its Loop container."""
    import os

    from infinibrain import security

    keys, allowed = tmp / "keys", tmp / "allowed"
    security.generate(keys, "manager")
    security.generate(keys, "client")
    allowed.mkdir()
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    os.environ[security.ENV_SERVER_KEY] = str(keys / "manager.key")
    os.environ[security.ENV_CLIENT_KEY] = str(keys / "client.key_secret")
    m = ManagerProcess(tmp / "curve", boards=("local",), log_level="WARNING", curve=True,
                       curve_secret_key=str(keys / "manager.key_secret"), curve_client_keys=str(allowed)).start()
    client = m.client()
    client.load_inference(ContainerConfig(name="bench", implementation_type="Loop", input="Main", output="Main", max_send_num=4), "local")
    return m, client


# ---- measurement --------------------------------------------------------------------------


def latency(call, image: np.ndarray, count: int, seconds: float) -> dict:
    for _ in range(min(20, count)):  # warm up
        call(image)
    samples = []
    deadline = time.monotonic() + seconds
    while len(samples) < count and time.monotonic() < deadline:
        t0 = time.perf_counter()
        call(image)
        samples.append(time.perf_counter() - t0)
    ms = np.array(samples) * 1000
    return {"n": len(samples), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def throughput_baseline(b: Baseline, image: np.ndarray, count: int, seconds: float, window: int = WINDOW) -> dict:
    sent = done = 0
    deadline = time.monotonic() + seconds
    t0 = time.perf_counter()
    while done < count and time.monotonic() < deadline:
        while sent - done < window and sent < count:
            b.send(image, sent)
            sent += 1
        if b.sock.poll(1000):
            b.recv()
            done += 1
    while done < sent and b.sock.poll(2000):  # drain what is still in flight
        b.recv()
        done += 1
    elapsed = time.perf_counter() - t0
    return {"n": done, "req_s": done / elapsed, "MB_s": done * image.nbytes / elapsed / 1e6}


Finish = Callable[[Optional[BaseException]], None]


def windowed(start: Callable[[Finish], Any], count: int, seconds: float, window: int) -> tuple[float, list[float]]:
    """Keep ``window`` requests in flight (``start(finished)`` sends one) until ``count``
    have ended or ``seconds`` passed: (requests per second, latencies in s). A request that
    ends with an error (``finished(error)``) makes it raise."""
    # Free slots as tokens in a SimpleQueue (C) rather than a threading.Semaphore (Python,
    # a Condition): the harness should cost as little as the baseline's single loop.
    slots: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(window):
        slots.put(None)
    latencies: list[float] = []
    errors: list[BaseException] = []

    def one() -> None:
        t0 = time.perf_counter()

        def finished(error: BaseException | None) -> None:
            latencies.append(time.perf_counter() - t0)
            if error is not None:
                errors.append(error)
            slots.put(None)

        start(finished)

    sent = 0
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    while sent < count and time.monotonic() < deadline:
        try:
            slots.get(timeout=10)
        except queue.Empty:
            break
        one()
        sent += 1
    end = time.monotonic() + 30
    while len(latencies) < sent and time.monotonic() < end:
        time.sleep(0.0005)
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return len(latencies) / elapsed, latencies


def throughput_ours(cluster: AICluster, name: str, image: np.ndarray, count: int, seconds: float) -> dict:
    """``infer_image_async`` with WINDOW in flight; requests that fail are counted, not raised."""
    failed = [0]

    def start(finished: Finish) -> None:
        def on_result(code, message, result, response):
            failed[0] += code != 0
            finished(None)

        cluster.infer_image_async(name, image, func=on_result)

    rate, latencies = windowed(start, count, seconds, WINDOW)
    done = len(latencies) - failed[0]
    req_s = rate * done / len(latencies) if latencies else 0.0
    return {"n": done, "errors": failed[0], "req_s": req_s, "MB_s": req_s * image.nbytes / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement (large images: a tenth)")
    parser.add_argument("--seconds", type=float, default=15.0, help="time bound per measurement")
    parser.add_argument("--docker", action="store_true", help="also measure a Docker container (infinibrain/runtime)")
    parser.add_argument("--arm64", action="store_true",
                        help="also measure an arm64 Docker container under emulation (infinibrain/runtime:arm64; for information)")
    parser.add_argument("--ssh", action="store_true", help="also measure a Loop container on an emulated SSH board")
    parser.add_argument("--curve", action="store_true", help="also measure a manager with CURVE on (authentication and encryption)")
    parser.add_argument("--json", help="write the figures here as JSON")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ib-bench-"))
    boards = SSHBoards(tmp / "boards", 1) if args.ssh else None
    if boards is not None:
        boards.start()
    settings = {"b1": boards.settings("b1")} if boards else {}
    manager = ManagerProcess(tmp, boards=("local", *settings), board_settings=settings, log_level="WARNING").start()
    cluster = manager.client()
    contenders = {"ours": (cluster, "bench")}
    cluster.load_inference(ContainerConfig(name="bench", implementation_type="Loop", input="Main", output="Main", max_send_num=4), "local")
    if args.docker:  # the runtime image's own command is the loopback module
        cluster.load_inference(ContainerConfig(name="bench-docker", implementation_type="docker", image_tag="infinibrain/runtime:latest",
                                               input="Main", output="Main", max_send_num=4), "local")
        contenders["docker"] = (cluster, "bench-docker")
    if args.arm64:  # the same module, an arm64 interpreter under qemu-user-static
        cluster.load_inference(ContainerConfig(name="bench-arm64", implementation_type="docker", image_tag="infinibrain/runtime:arm64",
                                               input="Main", output="Main", max_send_num=4, ready_timeout=120_000), "local")
        contenders["arm64"] = (cluster, "bench-arm64")
    if boards is not None:
        cluster.load_inference(ContainerConfig(name="bench-ssh", implementation_type="Loop", input="Main", output="Main", max_send_num=4), "b1")
        contenders["ssh"] = (cluster, "bench-ssh")
    secured = curve_manager(tmp) if args.curve else None
    if secured is not None:
        contenders["curve"] = (secured[1], "bench")
    from conftest import free_base_port

    baseline = Baseline(free_base_port(2), stop_after=20 * args.seconds)
    curve_baseline = Baseline(free_base_port(2), stop_after=20 * args.seconds, curve=True) if args.curve else None
    report = {"window": WINDOW, "payloads": {}}
    try:
        rng = np.random.default_rng(0)
        for label, shape in PAYLOADS.items():
            image = rng.integers(0, 256, size=shape, dtype=np.uint8)
            count = args.requests if image.nbytes < 1_000_000 else max(50, args.requests // 10)
            assert baseline.one(image)["bytes"] == image.nbytes
            row = {"baseline": {**latency(baseline.one, image, count, args.seconds), **throughput_baseline(baseline, image, count, args.seconds)}}
            if curve_baseline is not None:
                assert curve_baseline.one(image)["bytes"] == image.nbytes
                row["baseline_curve"] = {**latency(curve_baseline.one, image, count, args.seconds),
                                         **throughput_baseline(curve_baseline, image, count, args.seconds)}
            for who, (client, name) in contenders.items():
                assert client.infer_image(name, image)["bytes"] == image.nbytes
                row[who] = {**latency(lambda im, c=client, n=name: c.infer_image(n, im), image, count, args.seconds),
                            **throughput_ours(client, name, image, count, args.seconds)}
            def ratio(who: str) -> dict:
                b = row["baseline_curve" if who == "curve" else "baseline"]  # like against like
                return {"p50": row[who]["p50_ms"] / b["p50_ms"], "p99": row[who]["p99_ms"] / b["p99_ms"],
                        "throughput": row[who]["MB_s"] / b["MB_s"]}

            row["ratio"] = {who: ratio(who) for who in contenders}
            for who in ("docker", "arm64", "ssh", "curve"):
                if who in row:
                    row[f"{who}_vs_local_process"] = {"p50": row[who]["p50_ms"] / row["ours"]["p50_ms"],
                                                      "p99": row[who]["p99_ms"] / row["ours"]["p99_ms"],
                                                      "throughput": row[who]["MB_s"] / row["ours"]["MB_s"]}
            report["payloads"][label] = row
            print(f"{label:>12}  {'':8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} {'MB/s':>9}")
            for who in ("baseline", *(["baseline_curve"] if "baseline_curve" in row else []), *contenders):
                r = row[who]
                print(f"{'':>12}  {who:8} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['req_s']:9.1f} {r['MB_s']:9.1f}")
            for who, ratio in row["ratio"].items():
                of = "the CURVE baseline" if who == "curve" else "baseline"
                print(f"{'':>12}  {who:8} p50 x{ratio['p50']:.2f}  p99 x{ratio['p99']:.2f}  throughput x{ratio['throughput']:.2f} of {of}")
            for who in ("docker", "arm64", "ssh", "curve"):
                if f"{who}_vs_local_process" in row:
                    r = row[f"{who}_vs_local_process"]
                    print(f"{'':>12}  {who} / local process: p50 x{r['p50']:.3f}  p99 x{r['p99']:.3f}  throughput x{r['throughput']:.3f}")
            print()
    finally:
        baseline.close()
        if curve_baseline is not None:
            curve_baseline.close()
        for client, name in contenders.values():
            client.unload_inference(name, delete_image=False)
        cluster.release()
        if secured is not None:
            secured[1].release()
            secured[0].stop()
            secured[0].cleanup()
        manager.stop()
        manager.cleanup()
        if boards is not None:
            boards.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    mp.set_start_method("fork" if sys.platform == "linux" else "spawn")
    sys.exit(main())
