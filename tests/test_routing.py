"""Routing policy against a real manager and real containers: priorities, bounded queues
that say when to come back, retries when a replica dies, the last-replica rule, and a
status that tells the truth after a kill (docs/DECISIONS.md, "Routing")."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import echo_config, wait_for
from infinibrain import QueueInfo, SendQueueFullException
from infinibrain.errors import InfinibrainException
from loadgen import Load


def _rows(c, name: str) -> list[dict]:
    return c._client.command("get_container_status", {"inference_name": name}).wait()


def test_the_urgent_request_overtakes_waiting_ones_and_equal_priorities_keep_their_order(fresh_manager, name):
    m = fresh_manager(boards=("local",)).start()
    with m.client() as c:
        c.load_inference(echo_config(name, max_send_num=1), "local")
        served: list[str] = []
        lock = threading.Lock()

        def done(code, message, result, response):
            with lock:
                served.append(result["param"]["tag"] if code == 0 else f"error {code}")

        c.infer_async(name, b"x", {"sleep": 0.6, "tag": "first"}, func=done)
        wait_for(lambda: c.get_container_status(name)[0].send_data_num == 1)  # the first is in the container
        for i in range(4):
            c.infer_async(name, b"x", {"tag": f"low{i}"}, func=done)
        c.infer_image_async(name, np.zeros((2, 2), np.uint8), {"tag": "urgent"}, func=done, priority=5)
        queued = c.get_queue_info(name)
        assert all(isinstance(q, QueueInfo) for q in queued)
        assert [q.priority for q in queued] == [5, 0, 0, 0, 0]  # in the order they will be sent
        wait_for(lambda: len(served) == 6, timeout=15)
        assert served == ["first", "urgent", "low0", "low1", "low2", "low3"]
        # The sync and _future forms take it too, and refuse what is not an int (100).
        assert c.infer(name, b"x", {"tag": "sync"}, priority=-3)[0]["param"]["tag"] == "sync"
        assert c.infer_image_future(name, np.zeros((2, 2), np.uint8), priority=1).result(10)["shape"] == [2, 2]
        with pytest.raises(InfinibrainException) as err:
            c.infer(name, b"x", priority="high")  # type: ignore[arg-type]
        assert err.value.code == 100 and "priority" in str(err.value)
        c.unload_inference(name)


def test_a_full_queue_refuses_at_once_and_says_when_to_come_back(fresh_manager, name):
    m = fresh_manager(boards=("local",)).start()
    with m.client() as c:
        c.load_inference(echo_config(name, max_send_num=1, max_queue_size=2), "local")
        answers: list[int] = []
        for _ in range(3):  # one in the container, two waiting: the queue is full
            c.infer_async(name, b"x", {"sleep": 0.4}, func=lambda code, *a: answers.append(code))
        wait_for(lambda: len(c.get_queue_info(name)) == 2)
        started = time.monotonic()
        with pytest.raises(SendQueueFullException) as err:
            c.infer(name, b"x")
        assert time.monotonic() - started < 1.0
        assert err.value.code == 305 and err.value.retry_after is not None and 0 < err.value.retry_after <= 10
        assert "max_queue_size 2" in err.value.detail and "retry after" in err.value.detail
        refused: list = []
        c.infer_async(name, b"x", func=lambda code, message, result, response: refused.append((code, response)))
        code, response = wait_for(lambda: refused and refused[0])
        assert code == 305 and response.metadata_sys["retry_after"] > 0  # a callback gets it in the response
        wait_for(lambda: len(answers) == 3, timeout=10)
        assert answers == [0, 0, 0]
        c.unload_inference(name)


def test_with_retries_killing_one_of_two_replicas_under_load_fails_no_request(fresh_manager, name):
    m = fresh_manager().start()  # boards local and b2
    with m.client() as c:
        c.load_inference(echo_config(name, retries=2, max_send_num=2, run_option="--restart on-failure"), "all")
        with Load(c, name, threads=4, param={"sleep": 0.1}, max_requests=400, max_seconds=60) as load:
            victim = wait_for(lambda: next((o.pid for o in list(load.outcomes) if o.code == 0 and o.board == "local"), 0))
            wait_for(lambda: any(r["allocated_coprocessor"] == "local" and r["send_data_num"] > 0 for r in _rows(c, name)))
            os.kill(victim, signal.SIGKILL)  # it holds requests: they go to b2
            wait_for(lambda: c.stats()["retried"] >= 1, timeout=10)
            wait_for(lambda: len(load.outcomes) >= 200, timeout=60)
        load.check_all_ended(allowed=set())  # not one 402: each request that was on the victim was served by b2
        assert load.codes()[0] == len(load.outcomes) >= 200
        assert c.stats()["retried"] >= 1
        c.unload_inference(name)


def test_the_only_replica_serves_right_after_its_late_answer(fresh_manager, name):
    """The reference's 401: one container, a request answered late ends with 401, and the
    next one is served, not refused until the container's next heartbeat."""
    m = fresh_manager(boards=("local",)).start()
    with m.client() as c:
        c.load_inference(echo_config(name, max_send_num=1, wait_queue_timeout=800), "local")
        with pytest.raises(InfinibrainException) as err:
            c.infer(name, b"x", {"sleep": 1.2})
        assert err.value.code == 401
        assert _rows(c, name)[0]["state"] == "unhealthy"  # late: it still works on that request
        started = time.monotonic()
        result, _ = c.infer(name, b"next", {"tag": "next"})  # waits for the late answer, then is served
        assert result["param"] == {"tag": "next"} and time.monotonic() - started < 2.0
        assert _rows(c, name)[0]["state"] == "ready"
        c.unload_inference(name)


def test_status_after_a_kill_never_shows_ready_and_disconnected(fresh_manager, name):
    m = fresh_manager(boards=("local",)).start()
    with m.client() as c:
        c.load_inference(echo_config(name), "local")
        pid = c.infer(name, b"x")[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        seen = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            row = _rows(c, name)[0]
            seen.append((row["state"], row["connect_status"]))
            time.sleep(0.02)  # a sample every 20 ms: time, not synchronisation
        assert ("ready", "disconnected") not in seen, seen
        assert seen[-1] == ("failed", "disconnected") and any(s == "disconnected" for _, s in seen)
        c.unload_inference(name)
