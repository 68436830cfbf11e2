"""Routing policy under load (issue 24): priorities and retries, against the same system
without them, in the same run.

1. **Priority.** One inference, two replicas of a model that waits 10 ms per request
   (benchmarks/models/sleepy.py; no CPU, as on an accelerator), ``max_send_num=1`` (the
   queue stays in the manager, where priority applies). p50/p99 of high-priority requests
   (priority 10, one at a time) while another process keeps the inference saturated with
   low-priority ones (WINDOW in flight), against the same requests with no load (goal: p99
   within 2x), and against the same load at equal priority (for information).
2. **Retries.** Two replicas (``--restart on-failure``), 4 threads sending requests of
   20 ms; one replica SIGKILLed every few seconds, KILLS times: requests failed per kill
   with ``retries=0`` against ``retries=2`` (goal: 0 with).

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python benchmarks/bench_routing.py'

``--only priority,retries``. Every loop is bounded in count and in time.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import ManagerProcess, wait_for  # noqa: E402

from infinibrain import AICluster, ContainerConfig, InferenceModulesConfig  # noqa: E402
from infinibrain.errors import InfinibrainException  # noqa: E402

FRESH = mp.get_context("spawn")
WINDOW = 64


def config(name: str, **kw: Any) -> ContainerConfig:
    settings: dict[str, Any] = dict(name=name, implementation_type="process", input="Main", output="Main",
                                    script_path=str(HERE / "models"),
                                    inference_modules=InferenceModulesConfig(sub_inference_name=name, script="sleepy.py"))
    settings.update(kw)
    return ContainerConfig(**settings)


def percentiles(latencies: list[float]) -> tuple[float, float]:
    a = np.array(latencies) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


# ---- 1. priority --------------------------------------------------------------------------------


def low_load(port: int, name: str, seconds: float, ready: Any) -> None:
    """Another process: keeps WINDOW low-priority requests in flight for ``seconds``."""
    c = AICluster(port=port)
    stop = time.monotonic() + seconds
    slots = threading.Semaphore(WINDOW)
    done = {"n": 0}

    def finished(code: int, message: str, result: Any, response: Any) -> None:
        done["n"] += 1
        slots.release()

    ready.set()
    while time.monotonic() < stop:
        if slots.acquire(timeout=0.5):
            try:
                c.infer_async(name, b"low", {"ms": 10}, func=finished, priority=0)
            except InfinibrainException:
                slots.release()
                time.sleep(0.01)
    time.sleep(1.0)  # let what it sent end before it goes
    c.release()


def high_requests(c: AICluster, name: str, count: int, priority: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        c.infer(name, b"high", {"ms": 10}, priority=priority)
        out.append(time.perf_counter() - started)
        time.sleep(0.005)  # a camera's pace, not back to back: time, not synchronisation
    return out


def priority_section(c: AICluster, port: int, count: int) -> list[tuple[str, float, float, str]]:
    name = "prio"
    c.load_inference(config(name, max_send_num=1), ["local", "b2"])
    c.infer(name, b"warm", {"ms": 1})
    unloaded = high_requests(c, name, count, 10)
    rows = []
    for label, priority in (("priority 10 under load", 10), ("priority 0 under load (equal)", 0)):
        ready = FRESH.Event()
        load = FRESH.Process(target=low_load, args=(port, name, 8.0 + count * 0.03, ready))
        load.start()
        ready.wait(30)
        time.sleep(1.0)  # the load fills the queue before the measure starts: time, not synchronisation
        queued = len(c.get_queue_info(name))
        loaded = high_requests(c, name, count if priority else max(count // 5, 20), priority)
        load.join(60)
        rows.append((label, *percentiles(loaded), f"{queued} waiting"))
    base = percentiles(unloaded)
    print(f"\npriority: 2 replicas of a 10 ms model, max_send_num=1, {WINDOW} low-priority requests in flight from another process")
    print(f"{'measure':36} {'p50 ms':>8} {'p99 ms':>8}  {'vs unloaded p99':>15}  note")
    print(f"{'priority 10, no load':36} {base[0]:8.2f} {base[1]:8.2f}  {'':>15}")
    for label, p50, p99, note in rows:
        print(f"{label:36} {p50:8.2f} {p99:8.2f}  {'x%.2f' % (p99 / base[1]):>15}  {note}")
    high = rows[0]
    print(f"goal: priority 10's p99 under load within 2x of its unloaded p99: x{high[2] / base[1]:.2f} "
          f"({'holds' if high[2] <= 2 * base[1] else 'does NOT hold'})")
    c.unload_inference(name)
    return rows


# ---- 2. retries ------------------------------------------------------------------------------------


def retries_section(c: AICluster, m: ManagerProcess, kills: int) -> list[tuple[int, int, int]]:
    out = []
    for retries in (0, 2):
        name = f"retry{retries}"
        c.load_inference(config(name, retries=retries, max_send_num=2, run_option="--restart on-failure"), ["local", "b2"])
        failed: list[int] = []
        served = [0]
        stop = threading.Event()
        deadline = time.monotonic() + 30 + kills * 8

        def work() -> None:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    c.infer(name, b"x", {"ms": 20})
                    served[0] += 1
                except InfinibrainException as exc:
                    failed.append(exc.code)

        threads = [threading.Thread(target=work, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        for k in range(kills):
            board = ("local", "b2")[k % 2]
            pid = container_pid(m, name, board)
            time.sleep(0.5)  # under load: time, not synchronisation
            os.kill(pid, signal.SIGKILL)
            wait_back(c, name)  # restarted and ready before the next kill
        stop.set()
        for t in threads:
            t.join(30)
        out.append((retries, len(failed), served[0]))
        c.unload_inference(name)
    print(f"\nretries: 2 replicas, 4 threads of 20 ms requests, {kills} SIGKILLs of a replica under load")
    print(f"{'retries':>8} {'failed':>8} {'per kill':>9} {'served':>8}")
    for retries, failed_n, served_n in out:
        print(f"{retries:8d} {failed_n:8d} {failed_n / kills:9.2f} {served_n:8d}")
    with_retries = out[-1][1]
    print(f"goal: 0 failed per kill with retries: {with_retries / kills:.2f} ({'holds' if with_retries == 0 else 'does NOT hold'})")
    return out


def container_pid(m: ManagerProcess, name: str, board: str) -> int:
    """The pid the registry records for ``name``'s instance on ``board`` (the manager writes it)."""
    import json

    def recorded() -> int:
        try:
            data = json.loads((m.state_dir / "inferences" / f"{name}.json").read_text())
            records = data["boards"][board]["instances"]
            if records and records[-1].get("pid"):
                pid = int(records[-1]["pid"])
                os.kill(pid, 0)
                return pid
        except (OSError, ValueError, KeyError):
            pass
        return 0

    return wait_for(recorded, timeout=20, interval=0.1)  # the registry is written by its own thread: poll it


def wait_back(c: AICluster, name: str) -> None:
    def back() -> bool:
        rows = c._client.command("get_container_status", {"inference_name": name}).wait()
        return all(r["state"] == "ready" and r["connect_status"] == "connected" for r in rows)

    wait_for(back, timeout=30, interval=0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="priority,retries")
    parser.add_argument("--requests", type=int, default=300, help="high-priority requests measured per case")
    parser.add_argument("--kills", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        m = ManagerProcess(Path(folder), boards=("local", "b2"), log_level="WARNING", metrics_port=-1).start()
        try:
            c = m.client()
            if "priority" in args.only:
                priority_section(c, m.port, args.requests)
            if "retries" in args.only:
                retries_section(c, m, args.kills)
            c.release()
        finally:
            m.stop()
            m.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
