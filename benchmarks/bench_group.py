"""A manager group on etcd (issue 28), measured:

1. **Takeover**: a group of two managers (127.0.0.1, 127.0.0.2) on one etcd member, an
   echo inference (a process container), 4 application threads sending requests one
   after the other; the leader is SIGKILLed. Reported per round: seconds from the kill to
   the first request answered through the new leader, against the lease TTL (target:
   within 2x), and the failed requests, split into those sent before the kill (in flight
   or queued in the dead leader) and after it. Then the killed manager is started again
   (it stands by) and the next round kills the new leader.
2. **The request path** (``make bench-perf``'s ``group`` section): small requests to a
   Loop container, one at a time, median, through a group's leader and through a single
   manager side by side, in alternating rounds: requests never touch etcd, so the ratio
   should be 1.

    .venv/bin/python benchmarks/bench_group.py [--rounds 3] [--requests 2000]

Needs Debian's etcd-server (``make test`` installs it). Every loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import ManagerProcess, echo_config, wait_for  # noqa: E402
from bench_tracing import median_us, small_request  # noqa: E402
from group_kit import ETCD, EtcdCluster, Group  # noqa: E402
from table import Row, print_table, rounds_of  # noqa: E402

from infinibrain import AICluster, ContainerConfig  # noqa: E402
from infinibrain.errors import InfinibrainException  # noqa: E402

THREADS = 4
TTL = 3


def takeover(args: argparse.Namespace) -> list[dict]:
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="ib-bench-group-") as folder:
        etcd = EtcdCluster(Path(folder) / "etcd").start()
        g = Group(Path(folder), etcd, 2, log_level="INFO", leader_lease_s=TTL).start()
        try:
            with AICluster(g.host_ip, g.port, timeout=2 * TTL) as c:
                c.load_inference(echo_config("echo"), "local")
                for _ in range(args.rounds):
                    outcomes.append(one_takeover(c, g))
                    killed = next(m for m in g.members if m.proc.poll() is not None)
                    killed.start()  # it stands by for the next round
                    time.sleep(1)
                c.unload_inference("echo")
        finally:
            g.stop()
            etcd.stop()
    return outcomes


def one_takeover(c: AICluster, g: Group) -> dict:
    leader = wait_for(g.leader, timeout=20)
    done: list[tuple[float, float, int]] = []  # (sent, ended, code)
    stop = threading.Event()
    lock = threading.Lock()
    details: set[str] = set()

    def load() -> None:
        end = time.monotonic() + 30
        for _ in range(100_000):
            if stop.is_set() or time.monotonic() > end:
                return
            sent = time.monotonic()
            try:
                c.infer("echo", b"x" * 64)
                code = 0
            except InfinibrainException as exc:
                code = exc.code
                details.add(f"{exc.code}: {exc.detail}"[:160])
            with lock:
                done.append((sent, time.monotonic(), code))

    threads = [threading.Thread(target=load) for _ in range(THREADS)]
    for t in threads:
        t.start()
    time.sleep(2)
    killed_at = time.monotonic()
    leader.kill()
    wait_for(lambda: any(s > killed_at and code == 0 for s, _, code in list(done)), timeout=30, interval=0.01)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join(40)
    first = min(e for s, e, code in done if s > killed_at and code == 0)
    before = [code for s, e, code in done if s <= killed_at and code]
    after = [code for s, e, code in done if s > killed_at and code]
    answered = sum(1 for *_, code in done if code == 0)
    return {"seconds": first - killed_at, "failed_sent_before": len(before), "failed_sent_after": len(after),
            "codes": sorted(details), "answered": answered}


def request_path(args: argparse.Namespace) -> list[Row]:
    """p50 of small requests through a group's leader against a single manager."""
    with tempfile.TemporaryDirectory(prefix="ib-bench-group-") as folder:
        etcd = EtcdCluster(Path(folder) / "etcd").start()
        g = Group(Path(folder), etcd, 2, log_level="INFO").start()  # INFO: the kit reads who leads from the logs
        single = ManagerProcess(Path(folder) / "single", boards=("local",), log_level="WARNING", metrics_port=-1,
                                telemetry_interval_ms=0).start()
        try:
            with AICluster(g.host_ip, g.port) as grouped, single.client() as alone:
                clients = {"group": grouped, "single": alone}
                for c in clients.values():
                    c.load_inference(ContainerConfig(name="loop", implementation_type="Loop", input="Main", output="Main"),
                                     "local")
                    for _ in range(200):
                        c.infer("loop", b"x" * 64)
                figures = rounds_of(args.rounds_path, {k: (lambda c=c: median_us(small_request(c), args.requests, args.seconds))
                                                       for k, c in clients.items()}, rotate=True)
                for c in clients.values():
                    c.unload_inference("")
        finally:
            single.stop()
            single.cleanup()
            g.stop()
            etcd.stop()
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(f"group: rounds (µs) {', '.join(f'{k} {[round(x) for x in v]}' for k, v in figures.items())}")
    return [Row("group", "p50 small request, through a group's leader", med["group"], med["single"], "single manager",
                "<= 1.05", "us")]


def group_section(args: argparse.Namespace) -> list[Row]:
    if ETCD is None:
        print("group: skipped, etcd is not installed (Debian's etcd-server)")
        return []
    return request_path(args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="takeovers")
    parser.add_argument("--rounds-path", type=int, default=6, help="alternating rounds of the request path")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30.0, help="bound on each measurement")
    args = parser.parse_args()
    if ETCD is None:
        print("etcd is not installed (Debian's etcd-server)")
        return 1
    for i, o in enumerate(takeover(args), 1):
        print(f"takeover {i}: first answer through the new leader {o['seconds']:.2f} s after the SIGKILL "
              f"(lease TTL {TTL} s: x{o['seconds'] / TTL:.2f}, target <= x2); failed: {o['failed_sent_before']} sent before "
              f"the kill, {o['failed_sent_after']} after (codes {o['codes']}); {o['answered']} answered")
    print_table(request_path(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
