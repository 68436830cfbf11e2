"""The fault suite (`make faults`): real faults against real processes while load runs.

Each test keeps requests flowing from several threads while something breaks: a container
is SIGKILLed, the manager is SIGKILLed and started again, a client process is SIGKILLed,
a burst ten times the queue's capacity arrives, an SSH board is lost. Each checks that
every request sent ended (a result or a numbered error, within its deadline), that the
fault was reported as the fault matrix in docs/RELIABILITY.md says, and that service
came back.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest

from conftest import SCRIPTS, echo_config, manager_stats, wait_for
from infinibrain import InferenceModulesConfig
from infinibrain.errors import InfinibrainException
from loadgen import ANSWER_TIMEOUT_MS, SEND_TIMEOUT_MS, Load, events_of

def echo(name: str, **kw):
    return echo_config(name, **{"send_timeout": SEND_TIMEOUT_MS, "wait_queue_timeout": ANSWER_TIMEOUT_MS, **kw})


def processes_of(container_id: str, port: int) -> list[int]:
    """Pids of processes started for ``container_id`` by the manager on ``port``."""
    wanted = {f"INFINIBRAIN_CONTAINER={container_id}".encode(), f"INFINIBRAIN_PUB_PORT={port + 4}".encode()}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = set(fh.read().split(b"\0"))
            with open(f"/proc/{entry}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if wanted <= env:
            found.append(int(entry))
    return found


def pid_on(load: Load, board: str, since: float = 0.0) -> int:
    return wait_for(lambda: next((o.pid for o in reversed(list(load.outcomes)) if o.code == 0 and o.board == board and o.at > since), 0))


# ---- a container SIGKILLed -------------------------------------------------------------------


def test_container_sigkill_under_load_402_114_and_restart(fresh_manager, name):
    m = fresh_manager().start()
    c = m.client()
    events = events_of(c)
    c.load_inference(echo(name, run_option="--restart on-failure:3"), "all")
    with Load(c, name) as load:
        victim = pid_on(load, "local")
        wait_for(lambda: load.codes()[0] > 20)  # the load is flowing
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # The other replica serves while the victim is down.
        wait_for(lambda: ("b2", pid_on(load, "b2")) in load.served_since(killed_at), timeout=10)
        restart = wait_for(lambda: next((e for e in events if e[2] == "restart"), None), timeout=20)
        # Service comes back on the restarted container, a new process.
        wait_for(lambda: any(b == "local" and p != victim for b, p in load.served_since(restart[4])), timeout=20)
    load.check_all_ended(allowed={402})
    unsub = [e for e in events if e[0] == 114]
    assert len(unsub) == 1 and unsub[0][3]["suffix_name"] == f"{name}-local" and unsub[0][2] == "unsubscribe"
    assert restart[0] == 0 and f"{name}-local" in restart[1] and restart[3]["tries"] == 1
    assert load.codes()[0] > 50
    # The requests that were on the victim (if any were) ended with 402, each within its timeout.
    lost = [o for o in load.outcomes if o.code == 402]
    assert all(o.seconds < ANSWER_TIMEOUT_MS / 1000 for o in lost)
    assert len(processes_of(f"{name}-local", m.port)) == 1
    c.unload_inference(name)
    c.release()


def test_no_restart_by_default_and_giving_up_is_told(fresh_manager, name, tmp_path):
    m = fresh_manager().start()
    c = m.client()
    events = events_of(c)
    c.load_inference(echo(name), "local")
    pid = c.infer(name, b"x")[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: any(e[0] == 114 for e in events))
    time.sleep(2)  # a restart would have come after 0.5 s
    assert not [e for e in events if e[2] == "restart"]
    assert c.get_container_status(name)[0].status.startswith("exited")
    c.unload_inference(name)

    # A container that dies again on every start: two tries, then the manager says it gave up.
    marker = tmp_path / "started-once"
    script = tmp_path / "scripts"
    script.mkdir()
    (script / "once.py").write_text(
        "import os, sys\n"
        f"if os.path.exists({str(marker)!r}): sys.exit(4)\n"
        f"open({str(marker)!r}, 'w').close()\n"
        "exec(open(os.path.join(os.path.dirname(__file__), 'echo.py')).read())\n"
    )
    (script / "echo.py").write_text((SCRIPTS / "echo.py").read_text())
    cfg = echo(name, run_option="--restart=on-failure:2", script_path=str(script),
               inference_modules=InferenceModulesConfig(sub_inference_name="echo", script="once.py"))
    c.load_inference(cfg, "local")
    os.kill(c.infer(name, b"x")[0]["pid"], signal.SIGKILL)
    gave_up = wait_for(lambda: next((e for e in events if e[2] == "restart" and e[0] != 0), None), timeout=30)
    assert gave_up[0] == 302 and gave_up[1] == "Specified Param Error"  # the reference's text; what happened is the detail
    assert "not restarted" in gave_up[3]["detail"] and gave_up[3]["tries"] == 2
    c.unload_inference(name)
    c.release()


# ---- the manager SIGKILLed and started again ----------------------------------------------------


def test_manager_sigkill_under_load(fresh_manager, name):
    m = fresh_manager(heartbeat_interval_ms=200).start()
    c = m.client()
    events = events_of(c)
    c.load_inference(echo(name), "all")
    before = {f"{name}-{b}": processes_of(f"{name}-{b}", m.port) for b in ("local", "b2")}
    assert all(len(p) == 1 for p in before.values())
    with Load(c, name, max_seconds=120) as load:
        wait_for(lambda: load.codes()[0] > 20)
        m.kill()
        wait_for(lambda: any(e[0] == 112 for e in events), timeout=10)
        m.start()
        wait_for(lambda: any(e[0] == 113 for e in events), timeout=15)
        back = time.monotonic()
        # The same AICluster carries on, on both adopted containers.
        wait_for(lambda: {b for b, _ in load.served_since(back)} == {"local", "b2"}, timeout=30)
    load.check_all_ended(allowed={402, 111, 400})
    codes = [e[0] for e in events if e[2] == "keepalive"]
    assert codes[:2] == [112, 113]
    # Adopted, never duplicated: the same single process per container as before the kill.
    after = {cid: processes_of(cid, m.port) for cid in before}
    assert after == before
    assert len(c.get_container_handler(name)) == 2
    c.unload_inference(name)
    c.release()


# ---- a client process SIGKILLed ----------------------------------------------------------------

FLOODER = r"""
import sys, threading
from infinibrain import AICluster
c = AICluster(port=int(sys.argv[1]))
for _ in range(40):
    c.infer_async(sys.argv[2], b"x", {"sleep": 0.2}, func=lambda *a: None)
print("sent", flush=True)
threading.Event().wait(60)
"""


def test_killed_client_leaves_nothing_behind(fresh_manager, name):
    m = fresh_manager(client_timeout_ms=1500, send_queue_size=100).start()
    c = m.client()
    c.load_inference(echo(name, send_timeout=30000), "local")
    with Load(c, name, threads=2, param={}) as load:
        child = subprocess.Popen([sys.executable, "-c", FLOODER, str(m.port), name], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "sent"
            wait_for(lambda: any(q.pid == child.pid for q in c.get_queue_info(name)))
        finally:
            child.kill()
            child.wait()
        gone = time.monotonic()
        wait_for(lambda: not any(q.pid == child.pid for q in c.get_queue_info(name)), timeout=10)
        after_kill = manager_stats(c)
        wait_for(lambda: load.served_since(gone), timeout=5)
    load.check_all_ended(allowed=set())
    assert after_kill["clients"] == 1  # only ours is left
    # Nothing stays reserved for the dead client: no queued or running requests remain.
    final = manager_stats(c)
    assert final["queued"] == {} and final["in_flight"] == {}
    c.unload_inference(name)
    c.release()


# ---- a burst of ten times the queue's capacity -----------------------------------------------------


def test_burst_of_ten_times_the_queue_is_305_at_once_and_memory_stays_bounded(fresh_manager, name):
    capacity = 20
    m = fresh_manager(send_queue_size=capacity).start()
    c = m.client()
    handler = c.load_inference(echo(name, max_send_num=1), "local")
    image = np.zeros((256, 256, 3), np.uint8)  # 196 kB a request
    rss = [manager_stats(c)["rss_bytes"]]
    for _ in range(5):
        done: list[tuple[int, float]] = []
        lock = threading.Lock()
        started = time.monotonic()

        def record(code, msg, result, response):
            with lock:
                done.append((code, time.monotonic() - started))

        handler.stop_distribution()  # nothing drains during the burst: the queue alone holds
        for _ in range(10 * capacity):
            c.infer_image_async(name, image, {"sleep": 0.01}, func=record)
        wait_for(lambda: len(done) == 10 * capacity - capacity, timeout=30)
        full = [t for code, t in done if code == 305]
        assert len(full) == 10 * capacity - capacity
        assert max(full) < 2.0  # refused at once, not after a timeout
        handler.start_distribution()
        wait_for(lambda: len(done) == 10 * capacity, timeout=30)
        assert Counter(code for code, _ in done) == {305: 9 * capacity, 0: capacity}
        rss.append(manager_stats(c)["rss_bytes"])
    # 1,000 requests of 196 kB were offered; the manager holds at most a queue's worth.
    assert rss[-1] - rss[1] < 40e6, f"manager memory grew from {rss[1]} to {rss[-1]} bytes"
    c.unload_inference(name)
    c.release()


# ---- an SSH board lost while requests run on its containers -------------------------------------------


def test_ssh_board_lost_under_load(ssh_boards, tmp_path, name):
    m = ssh_boards.manager(tmp_path / "m").start()
    try:
        c = m.client()
        events = events_of(c)
        c.load_inference(echo(name), "all")
        with Load(c, name, param={"sleep": 0.05}) as load:
            victim = pid_on(load, "b1")
            wait_for(lambda: load.codes()[0] > 20)  # the load is flowing
            # Power loss: the board's sshd and its containers go at once.
            ssh_boards.stop("b1")
            os.killpg(os.getpgid(victim), signal.SIGKILL)
            lost_at = time.monotonic()
            wait_for(lambda: any(e[0] == 114 for e in events), timeout=10)
            wait_for(lambda: any(b == "b2" for b, _ in load.served_since(lost_at + 0.5)), timeout=10)
            # Commands that need the lost board fail with 500 naming it, in bounded time.
            handler = next(h for h in c.get_container_handler(name) if h.allocated_coprocessor == "b1")
            started = time.monotonic()
            with pytest.raises(InfinibrainException) as err:
                handler.start()
            assert err.value.code == 500 and "b1" in str(err.value)
            assert time.monotonic() - started < 15
        load.check_all_ended(allowed={402})
        assert next(e for e in events if e[0] == 114)[3]["coprocessor"] == "b1"
        # The board comes back: its container starts again without restarting the manager.
        ssh_boards.start("b1")
        wait_for(lambda: _started(handler), timeout=30)
        assert {c.infer(name, b"x")[0]["board"] for _ in range(8)} == {"b1", "b2"}
        c.unload_inference(name)
        c.release()
    finally:
        m.stop()
        m.cleanup()


def _started(handler) -> bool:
    try:
        handler.start()
        return True
    except InfinibrainException:
        return False
