"""The manager under hostile or careless input (issue 25): its memory, and a normal client's
latency, during each flood, against the same client with no flood in the same run.

Floods, each from other processes, one at a time: one message with a 60 MB header; 400
messages with 5 MB headers; three subscribers that ask for 300 kB results and never read
them. Meanwhile a normal client sends small requests one at a time (``infer``, a ``Loop``
container) and the manager's resident size is sampled. Reported: the normal client's p99
against its p99 with no flood (goal: within 3x), the manager's peak growth, and its size
5 s after the flood ended (memory back near its baseline).

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python benchmarks/bench_floods.py'

Runs against a manager without CURVE (the floods' peers hold no keys: this measures what
the manager holds, not who may connect). Every loop is bounded in count and in time.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import ManagerProcess, echo_config  # noqa: E402
from loadgen import flood, rss  # noqa: E402

from infinibrain import AICluster, ContainerConfig  # noqa: E402

FRESH = mp.get_context("spawn")
# Each flood: (bytes of a request's header, 0 for requests whose results are never read; messages sent).
FLOODS = {"60 MB header": (60_000_000, 1), "400 x 5 MB headers": (5_000_000, 400), "3 never-reading subscribers": (0, 900)}


def measure(c: AICluster, pid: int, name: str, seconds: float, floods: list) -> tuple[list[float], int]:
    """Latencies of one-at-a-time requests and the manager's peak size while ``floods`` run
    (or for ``seconds`` when there are none)."""
    latencies, peak = [], rss(pid)
    end = time.monotonic() + (seconds if not floods else 60)
    for f in floods:
        f.start()
    while time.monotonic() < end and (not floods or any(f.is_alive() for f in floods)):
        started = time.perf_counter()
        try:
            c.infer(name, b"normal", {})
            latencies.append(time.perf_counter() - started)
        except Exception:
            latencies.append(float("inf"))  # a lost or refused request counts as the worst
        peak = max(peak, rss(pid))
    for f in floods:
        f.join(30)
    return latencies, peak


def one(what: str, count: int, seconds: float) -> None:
    """One flood against a manager of its own (what one flood leaves must not weigh on the next)."""
    with tempfile.TemporaryDirectory() as folder:
        m = ManagerProcess(Path(folder), boards=("local",), log_level="WARNING", metrics_port=-1).start()
        try:
            c = m.client()
            c.load_inference(ContainerConfig(name="normal", implementation_type="Loop", input="Main", output="Main"), "local")
            c.load_inference(echo_config("big", max_send_num=4), "local")
            for _ in range(200):
                c.infer("normal", b"warm")
            pid = m.proc.pid
            quiet, _ = measure(c, pid, "normal", seconds, [])
            base_p99 = float(np.percentile(np.array(quiet) * 1000, 99))
            before = rss(pid)
            header_bytes, sent = FLOODS[what]
            floods = [FRESH.Process(target=flood, args=(m.port, None, "big", header_bytes, sent)) for _ in range(count)]
            lat, peak = measure(c, pid, "normal", 0, floods)
            time.sleep(5.0)  # what the manager keeps once it is over: time, not synchronisation
            arr = np.array(lat) * 1000
            failed = int(np.isinf(arr).sum())
            p99 = float(np.percentile(arr, 99))
            print(f"{what:28} {base_p99:8.2f} {p99:8.2f} {'x%.2f' % (p99 / base_p99):>9} {arr[~np.isinf(arr)].max():9.1f} "
                  f"{failed:7d} {before / 1e6:7.0f} {(peak - before) / 1e6:9.0f} {(rss(pid) - before) / 1e6:14.0f}", flush=True)
            c.release()
        finally:
            m.stop()
            m.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="the no-flood measure")
    args = parser.parse_args()
    print(f"{'flood':28} {'p99 ms':>8} {'flooded':>8} {'ratio':>9} {'worst ms':>9} {'failed':>7} {'base MB':>7} "
          f"{'peak +MB':>9} {'+MB 5 s after':>14}")
    for what, count in (("60 MB header", 1), ("400 x 5 MB headers", 1), ("3 never-reading subscribers", 3)):
        one(what, count, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
