"""The control plane: deployment to many boards at once, and dispatch with many containers.

Deployment: a ``process`` container whose model takes 3 s to load (tests/scripts/slowstart.py)
is loaded on 1, 4 and 16 local boards at once (one ``load_inference`` on a list of boards),
and, with ``--ssh``, on 4 emulated SSH boards (real sshd on 127.0.0.2-5). Each is compared
with the same container loaded on each of those boards alone, one after the other: boards
in parallel should take about the maximum of those single-board times, not their sum.

Dispatch: one ``Loop`` inference on one board, measured (p50 of one request at a time, and
the manager's own CPU time per request with WINDOW in flight, read from /proc) while 2, 20
and 200 containers are registered (the rest are ``other`` containers: registered, routed
to, run by nobody). Picking a container looks at its own inference's containers only, so
the figures should not grow with the count. The raw pyzmq two-hop baseline of
bench_infer.py is measured in the same run, for scale.

    python benchmarks/bench_control.py [--quick] [--ssh] [--requests N] [--json PATH]

Every loop is bounded in count and in time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infer import Baseline, latency, throughput_ours  # noqa: E402
from conftest import ManagerProcess, SSHBoards, echo_config, free_base_port  # noqa: E402

from infinibrain import ContainerConfig  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def slow(name: str) -> ContainerConfig:
    return echo_config(name, run_command="python slowstart.py")


def timed(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def deployment(m: ManagerProcess, boards: list[str], label: str) -> dict:
    """Seconds to load on every board at once, against each board alone."""
    with m.client(timeout=10) as c:
        alone = []
        for b in boards:
            alone.append(timed(lambda: c.load_inference(slow(f"alone-{b}"), b)))
            c.unload_inference(f"alone-{b}")
        together = timed(lambda: c.load_inference(slow("together"), boards))
        c.unload_inference("together")
    row = {"boards": len(boards), "where": label, "together_s": round(together, 2), "sum_alone_s": round(sum(alone), 2),
           "max_alone_s": round(max(alone), 2)}
    row["x_of_max"] = round(together / row["max_alone_s"], 2)
    row["x_of_sum"] = round(together / row["sum_alone_s"], 2)
    print(f"deploy to {len(boards):2d} {label} boards: {together:6.2f} s together; alone: sum {sum(alone):6.2f} s, "
          f"max {max(alone):5.2f} s -> x{row['x_of_max']} of the max, x{row['x_of_sum']} of the sum", flush=True)
    return row


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def dispatch(tmp: Path, registered: int, requests: int) -> dict:
    """p50 and manager CPU per request of one Loop inference, with ``registered`` containers."""
    m = ManagerProcess(tmp / f"d{registered}", boards=("local", "b2"), log_level="WARNING").start()
    try:
        with m.client(timeout=10) as c:
            c.load_inference(ContainerConfig(name="measured", implementation_type="Loop", input="Main", output="Main",
                                             max_send_num=4), "all")
            for i in range(registered - 2):  # the others: registered and routed to, run by nobody
                c.load_inference(echo_config(f"filler{i}", implementation_type="other"), "local" if i % 2 else "b2")
            image = np.zeros((224, 224, 3), np.uint8)
            lat = latency(lambda img: c.infer_image("measured", img), image, requests, 60)
            before = cpu_seconds(m.proc.pid)
            tput = throughput_ours(c, "measured", image, requests, 60)
            cpu = cpu_seconds(m.proc.pid) - before
    finally:
        m.stop()
        m.cleanup()
    row = {"registered": registered, "p50_ms": round(lat["p50_ms"], 3), "req_s": round(tput["req_s"]),
           "manager_cpu_us_per_request": round(cpu / max(tput["n"], 1) * 1e6, 1)}
    print(f"{registered:3d} containers registered: p50 {row['p50_ms']:.3f} ms, {row['req_s']} req/s, "
          f"manager CPU {row['manager_cpu_us_per_request']} us/request", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 and 4 local boards only; 2 and 20 containers")
    ap.add_argument("--ssh", action="store_true", help="also 4 emulated SSH boards (needs openssh-server)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    out: dict = {"deploy": [], "dispatch": []}
    with tempfile.TemporaryDirectory(prefix="ib-bench-control-") as folder:
        tmp = Path(folder)
        counts = (1, 4) if args.quick else (1, 4, 16)
        m = ManagerProcess(tmp / "local", boards=tuple(f"b{i}" for i in range(1, max(counts) + 1)), log_level="WARNING",
                           container_start_timeout_ms=120_000).start()
        try:
            for n in counts:
                out["deploy"].append(deployment(m, [f"b{i}" for i in range(1, n + 1)], "local"))
        finally:
            m.stop()
            m.cleanup()
        if args.ssh:
            boards = SSHBoards(tmp / "boards", 4)
            boards.start()
            try:
                sm = boards.manager(tmp / "ssh", boards=("b1", "b2", "b3", "b4"), log_level="WARNING").start()
                try:
                    out["deploy"].append(deployment(sm, ["b1", "b2", "b3", "b4"], "SSH"))
                finally:
                    sm.stop()
                    sm.cleanup()
            finally:
                boards.stop()
        base = Baseline(free_base_port(2), stop_after=120)
        try:
            image = np.zeros((224, 224, 3), np.uint8)
            raw = latency(base.one, image, args.requests, 60)
            out["baseline_p50_ms"] = round(raw["p50_ms"], 3)
            print(f"raw pyzmq two hops (bench_infer.py's baseline): p50 {raw['p50_ms']:.3f} ms", flush=True)
        finally:
            base.close()
        for registered in ((2, 20) if args.quick else (2, 20, 200)):
            out["dispatch"].append(dispatch(tmp, registered, args.requests))
    first = out["dispatch"][0]
    for row in out["dispatch"]:
        row["p50_x_of_2"] = round(row["p50_ms"] / first["p50_ms"], 2)
        row["cpu_x_of_2"] = round(row["manager_cpu_us_per_request"] / first["manager_cpu_us_per_request"], 2)
    print("dispatch against 2 containers: " + ", ".join(
        f"{r['registered']}: p50 x{r['p50_x_of_2']}, CPU x{r['cpu_x_of_2']}" for r in out["dispatch"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
