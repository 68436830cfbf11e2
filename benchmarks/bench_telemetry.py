"""The manager's CPU for board telemetry (issue 27): a manager with 16 boards sampled every
second, idle, against the same manager with telemetry off, over the same time; the CPU
of the manager process itself (its reader threads parse every block), from /proc. The
samplers (sh loops, one per board) are children of their own: their cost is the board's,
shown separately.

    .venv/bin/python benchmarks/bench_telemetry.py [--seconds 30] [--boards 16]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_control import cpu_seconds  # noqa: E402
from conftest import running_manager  # noqa: E402

def children_cpu(pid: int) -> float:
    """CPU of the manager's child processes that still run (the samplers and their sleeps)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += cpu_seconds(int(child))
            except OSError:
                pass
    return total


def measure(boards: int, interval_ms: int, seconds: float) -> tuple[float, float]:
    names = tuple(f"b{i}" for i in range(1, boards + 1))
    with tempfile.TemporaryDirectory() as folder, \
            running_manager(Path(folder), boards=names, log_level="WARNING", metrics_port=-1,
                            telemetry_interval_ms=interval_ms) as m:
        time.sleep(3)  # start-up done, samplers running
        pid = m.proc.pid
        start, kids = cpu_seconds(pid), children_cpu(pid)
        time.sleep(seconds)
        return (cpu_seconds(pid) - start) / seconds, (children_cpu(pid) - kids) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--boards", type=int, default=16)
    args = parser.parse_args()
    off, _ = measure(args.boards, 0, args.seconds)
    on, samplers = measure(args.boards, 1000, args.seconds)
    print(f"manager with {args.boards} boards, idle, {args.seconds:g} s: telemetry off {off * 100:.2f}% of a core, "
          f"every 1 s {on * 100:.2f}%: telemetry costs {(on - off) * 100:.2f}% of a core (target: under 1%); "
          f"the {args.boards} samplers themselves (sh, on the boards) {samplers * 100:.2f}% (still-running ones only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
