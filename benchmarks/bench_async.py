"""What the safe ``_async`` inference costs: the wait for the manager's acknowledgement
(so 403/402 can be raised at call time) and the copy of a writable buffer (so a caller may
reuse it at once), against the bare path (sent, not waited for, not copied), all in one run.

Three ways of sending the same images to a ``Loop`` container, WINDOW in flight:

- ``bare``: the request sent and handed to the callback, as ``infer_image_async`` was
  before (zero copy, no wait);
- ``read-only``: ``infer_image_async`` with a read-only array (no copy; waits for the ack);
- ``writable``: ``infer_image_async`` with a writable array (copied; waits for the ack),
  the default a caller gets.

    python benchmarks/bench_async.py [--requests N] [--rounds R] [--json PATH]

Every loop is bounded in count and in time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_infer import windowed  # noqa: E402
from conftest import ManagerProcess  # noqa: E402

from infinibrain import AICluster, ContainerConfig  # noqa: E402

PAYLOADS = {"224x224x3": (224, 224, 3), "1920x1080x3": (1080, 1920, 3)}
WINDOW = 8


def throughput(send, image: np.ndarray, count: int, seconds: float) -> float:
    """Requests per second with WINDOW in flight; ``send(image, callback)``."""
    def start(finished) -> None:
        send(image, lambda code, message, result, response: finished(None if code == 0 else RuntimeError(f"[{code}] {message}")))

    return windowed(start, count, seconds, WINDOW)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3, help="rounds, alternating the three ways; medians reported")
    ap.add_argument("--json")
    args = ap.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="ib-bench-async-") as folder:
        m = ManagerProcess(Path(folder), boards=("local",), log_level="WARNING").start()
        try:
            with AICluster(port=m.port) as c:
                c.load_inference(ContainerConfig(name="bench", implementation_type="Loop", input="Main", output="Main",
                                                 max_send_num=WINDOW), "local")
                ways = {
                    "bare": lambda img, cb: c._submit("bench", img, {}, True, cb),
                    "read-only": lambda img, cb: c.infer_image_async("bench", img, func=cb),
                    "writable": lambda img, cb: c.infer_image_async("bench", img, func=cb),
                }
                for label, shape in PAYLOADS.items():
                    writable = np.random.default_rng(1).integers(0, 255, shape, np.uint8)
                    readonly = writable.copy()
                    readonly.setflags(write=False)
                    images = {"bare": writable, "read-only": readonly, "writable": writable}
                    count = args.requests if shape[0] < 1000 else max(args.requests // 10, 100)
                    figures: dict[str, list[float]] = {w: [] for w in ways}
                    for _ in range(args.rounds):
                        for way, send in ways.items():
                            throughput(send, images[way], min(200, count), 30)  # warm up
                            figures[way].append(throughput(send, images[way], count, 120))
                    row = {w: round(statistics.median(v), 1) for w, v in figures.items()}
                    row["read-only / bare"] = round(row["read-only"] / row["bare"], 3)
                    row["writable / bare"] = round(row["writable"] / row["bare"], 3)
                    out[label] = row
                    print(f"{label}: req/s bare {row['bare']}, read-only {row['read-only']} (x{row['read-only / bare']}), "
                          f"writable {row['writable']} (x{row['writable / bare']})", flush=True)
        finally:
            m.stop()
            m.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
