"""Soak: many requests through a cluster whose containers keep getting killed.

A real manager with four local boards runs one ``Loop`` inference with a container on each
(``--restart on-failure``, so the manager brings killed ones back). Two client processes
keep WINDOW requests each in flight with ``infer_async``; every few seconds this process
SIGKILLs a random container. Each client counts, per request it sent: a result, a numbered
error, two answers (duplicated), an answer later than the request's deadline (hung), or
none at all by the end (lost). The manager's memory is read at the start, every kill, and
the end.

    python benchmarks/soak.py [--requests 1000000] [--seconds 300] [--kill-every 3] [--json PATH]

Bounded by both the request count and the time. Target: 0 lost, 0 duplicated, 0 hung,
memory flat. Figures are in docs/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import ManagerProcess  # noqa: E402  (the same real-manager harness as the tests)

from infinibrain import AICluster, ContainerConfig  # noqa: E402
from infinibrain.errors import InfinibrainException  # noqa: E402

BOARDS = ("b1", "b2", "b3", "b4")
NAME = "soak"
WINDOW = 32
SEND_TIMEOUT_MS = 5000
ANSWER_TIMEOUT_MS = 5000
# A request ends by its send and answer timeouts, plus the SDK's grace: later means hung.
GRACE = (SEND_TIMEOUT_MS + ANSWER_TIMEOUT_MS) / 1000 + 5


def client(port: int, quota: int, seconds: float, out: mp.Queue) -> None:
    """One client process: keep WINDOW requests in flight; report how each ended."""
    cluster = AICluster(port=port, timeout=10)
    lock = threading.Lock()
    window = threading.Semaphore(WINDOW)
    answers: Counter = Counter()  # request number -> answers received
    codes: Counter = Counter()
    sent: dict[str, float] = {}  # request number -> when it was sent
    late: list[float] = []  # answers later than a request's deadline: it hung for a while
    slowest = [0.0]
    refused_at_call: Counter = Counter()

    def done(code, message, result, response) -> None:
        now = time.monotonic()
        with lock:
            rid = response.request_no
            answers[rid] += 1
            codes[code] += 1
            if rid in sent:
                took = now - sent[rid]
                slowest[0] = max(slowest[0], took)
                if took > GRACE:
                    late.append(took)
        window.release()

    payload = os.urandom(4096)
    deadline = time.monotonic() + seconds
    n = 0
    while n < quota and time.monotonic() < deadline:
        if not window.acquire(timeout=GRACE):
            break  # nothing came back for a whole grace period: counted as hung below
        n += 1
        with lock:  # held across the send, so an answer always finds its send time
            t0 = time.monotonic()
            try:
                rid = cluster.infer_async(NAME, payload, {"n": n}, func=done)
            except InfinibrainException as exc:  # e.g. 111 while the manager is away: never sent
                refused_at_call[exc.code] += 1
                window.release()
                time.sleep(0.01)
                continue
            sent[rid] = t0
    end = time.monotonic() + GRACE
    while time.monotonic() < end:
        with lock:
            if all(answers[r] for r in sent):
                break
        time.sleep(0.1)
    with lock:
        missing = [r for r in sent if not answers[r]]
        report = {
            "sent": len(sent),
            "answered": sum(1 for r in sent if answers[r]),
            "codes": {str(k): v for k, v in codes.items()},
            "duplicated": sum(1 for r in sent if answers[r] > 1),
            "unknown_answers": sum(1 for r in answers if r not in sent),
            "lost": len(missing),
            "hung": len(late),
            "slowest": slowest[0],
            "refused_at_call": {str(k): v for k, v in refused_at_call.items()},
        }
    cluster.release()
    out.put(report)


def pids_of(state_dir: Path) -> dict[str, int]:
    data = json.loads((state_dir / "inferences" / f"{NAME}.json").read_text())
    return {board: p.get("pid") or 0 for board, p in data["boards"].items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000, help="total over both clients")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="infinibrain-soak-"))
    m = ManagerProcess(tmp, boards=BOARDS, log_level="INFO").start()
    kills = 0
    try:
        admin = m.client(timeout=10)
        admin.load_inference(ContainerConfig(
            name=NAME, implementation_type="Loop", input="Main", output="Main", max_send_num=4,
            send_timeout=SEND_TIMEOUT_MS, wait_queue_timeout=ANSWER_TIMEOUT_MS, run_option="--restart on-failure"), "all")
        stats = admin.stats
        rss_start = stats()["rss_bytes"]
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=client, args=(m.port, args.requests // 2, args.seconds, out)) for _ in range(2)]
        started = time.monotonic()
        for p in procs:
            p.start()
        rng = random.Random(1)
        next_kill = started + args.kill_every
        rss_samples = [rss_start]
        while any(p.is_alive() for p in procs) and time.monotonic() < started + args.seconds + GRACE + 30:
            time.sleep(0.2)
            if time.monotonic() >= next_kill and time.monotonic() < started + args.seconds - 2:
                next_kill += args.kill_every
                board = rng.choice(BOARDS)
                pid = pids_of(m.state_dir).get(board)
                try:
                    os.killpg(pid, signal.SIGKILL)  # the container's own session: only what the manager started
                    kills += 1
                except (ProcessLookupError, PermissionError, TypeError):
                    pass  # already dead, being restarted
                rss_samples.append(stats()["rss_bytes"])
        reports = [out.get(timeout=GRACE + 60) for _ in procs]
        for p in procs:
            p.join(10)
        seconds = time.monotonic() - started
        time.sleep(1)
        rss_end = stats()["rss_bytes"]
        admin.unload_inference(NAME)
        admin.release()
    finally:
        m.stop()
        m.cleanup()

    total = Counter()
    codes: Counter = Counter()
    refused: Counter = Counter()
    for r in reports:
        total.update({k: r[k] for k in ("sent", "answered", "duplicated", "lost", "hung", "unknown_answers")})
        codes.update(r["codes"])
        refused.update(r["refused_at_call"])
    results = codes.get("0", 0)
    errors = sum(v for k, v in codes.items() if k != "0")
    figures = {
        "requests_sent": total["sent"],
        "results": results,
        "numbered_errors": errors,
        "errors_by_code": dict(codes - Counter({"0": results})),
        "lost": total["lost"],
        "duplicated": total["duplicated"],
        "hung": total["hung"],
        "slowest_answer_s": round(max(r["slowest"] for r in reports), 2),
        "answers_to_unknown_requests": total["unknown_answers"],
        "refused_at_call": dict(refused),
        "containers_killed": kills,
        "seconds": round(seconds, 1),
        "requests_per_second": round(total["sent"] / seconds),
        "manager_rss_start_mb": round(rss_start / 1e6, 1),
        "manager_rss_end_mb": round(rss_end / 1e6, 1),
        "manager_rss_max_mb": round(max(rss_samples + [rss_end]) / 1e6, 1),
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ok = figures["lost"] == 0 and figures["duplicated"] == 0 and figures["hung"] == 0
    print("soak: " + ("PASS (0 lost, 0 duplicated, 0 hung)" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
