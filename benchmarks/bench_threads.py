"""CPU per request by process and thread: infinibrain against the raw broker.

The same 224x224x3 requests with 16 in flight (``infer_image_future``; the broker's own
client loop), then each thread's user + system CPU from ``/proc/<pid>/task/*/stat``
divided by the requests. A container's and a worker's figures are per request of all
(each serves about half): double them for per request served. Where BENCHMARKS.md's
"Where the rest goes" table comes from.

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python benchmarks/bench_threads.py'
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_infer import throughput_baseline, windowed  # noqa: E402
from bench_perf import WINDOW, Broker, PubSubForwarder, by_future, image_of, model_config  # noqa: E402
from conftest import ManagerProcess  # noqa: E402

from infinibrain import AICluster  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[tuple[str, str], float]:
    """CPU seconds so far of each thread of ``pid``: {(name, tid): seconds}."""
    out = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            stat = Path(task, "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[(name, task.rsplit("/", 1)[1])] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def measure(label: str, procs: dict[str, int], run: Callable[[], tuple[int, float]]) -> None:
    before = {k: thread_cpu(p) for k, p in procs.items()}
    n, rate = run()
    print(f"{label}: {rate:.0f} req/s over {n} requests")
    total = 0.0
    for k, pid in procs.items():
        for thread, seconds in sorted(thread_cpu(pid).items()):
            used = seconds - before[k].get(thread, 0.0)
            if used > 0:
                total += used
                print(f"  {k:10s} {thread[0]:24s} {1e6 * used / n:7.1f} us/request")
    print(f"  {'all':10s} {'':24s} {1e6 * total / n:7.1f} us/request")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8000)
    ap.add_argument("--seconds", type=float, default=60.0, help="bound on each run")
    args = ap.parse_args()
    image = image_of((224, 224, 3))

    with tempfile.TemporaryDirectory(prefix="ib-bench-threads-") as folder:
        m = ManagerProcess(Path(folder), boards=("local", "b2"), log_level="WARNING", metrics_port=-1).start()
        try:
            with AICluster(port=m.port) as c:
                c.load_inference(model_config("mean", "mean.py"), "all")
                containers = [int(p) for p in os.popen(f"pgrep -P {m.proc.pid}").read().split()]
                start = by_future(c, "mean", image)
                windowed(start, 500, args.seconds, WINDOW)  # warm up

                def ours() -> tuple[int, float]:
                    rate, latencies = windowed(start, args.requests, args.seconds, WINDOW)
                    return len(latencies), rate

                procs = {"manager": m.proc.pid, "client": os.getpid()}
                procs.update({f"container{i}": pid for i, pid in enumerate(containers)})
                measure("infinibrain", procs, ours)
                c.unload_inference("mean")
        finally:
            m.stop()

    for label, baseline in (("lbbroker", Broker), ("raw pub/sub forwarder (our topology)", PubSubForwarder)):
        measure_baseline(label, baseline(stop_after=600), image, args)
    return 0


def measure_baseline(label: str, baseline: Broker | PubSubForwarder, image, args: argparse.Namespace) -> None:
    try:
        throughput_baseline(baseline, image, 500, args.seconds, WINDOW)  # warm up

        def raw() -> tuple[int, float]:
            r = throughput_baseline(baseline, image, args.requests, args.seconds, WINDOW)
            return r["n"], r["req_s"]

        procs = {"broker": baseline.procs[0].pid, "client": os.getpid()}
        procs.update({f"worker{i}": p.pid for i, p in enumerate(baseline.procs[1:])})
        measure(label, procs, raw)
    finally:
        baseline.close()


if __name__ == "__main__":
    sys.exit(main())
