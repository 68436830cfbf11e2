"""Send-wait queues, credits and timeouts: 305, 306, 401, 308, get_queue_info, delete_queue."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import echo_config, in_manager, wait_for
from infinibrain import (
    ContainerReceiveTimeoutException,
    PermissionException,
    QueueInfo,
    SendQueueFullException,
    SendQueueTimeoutException,
)


def collector():
    got: dict[str, tuple] = {}

    def cb(code, message, result, response):
        got[response.request_no] = (code, message, result)

    return got, cb


def test_credits_hold_requests_in_the_manager(cluster, name):
    cluster.load_inference(echo_config(name, max_send_num=1), "local")
    got, cb = collector()
    rids = [cluster.infer_async(name, b"x", {"sleep": 1.0}, func=cb) for _ in range(4)]
    wait_for(lambda: in_manager(cluster, name) == 4)  # all four reached the manager
    status = cluster.get_container_status(name)[0]
    assert status.send_data_num == 1 and status.queue_num == 3 and status.operate == "Busy"
    queued = cluster.get_queue_info(name)
    assert all(isinstance(q, QueueInfo) for q in queued)
    assert sorted(q.request_no for q in queued) == sorted(int(r) for r in rids[1:])
    assert {q.pid for q in queued} == {os.getpid()} and all(q.mng_queue_in for q in queued)
    assert [q.request_no for q in cluster.get_queue_info(name, request_no=int(rids[2]))] == [int(rids[2])]
    wait_for(lambda: len(got) == 4)
    assert all(code == 0 for code, _, _ in got.values())
    status = cluster.get_container_status(name)[0]
    assert (status.send_data_num, status.queue_num, status.operate) == (0, 0, "Free")
    cluster.unload_inference(name)


def test_queue_full_is_305_at_once(fresh_manager, name):
    m = fresh_manager(send_queue_size=3).start()
    c = m.client()
    c.load_inference(echo_config(name, max_send_num=1), "local")
    got, cb = collector()
    for _ in range(4):  # one in the container, three waiting: the queue is full
        c.infer_async(name, b"x", {"sleep": 0.5}, func=cb)
    wait_for(lambda: in_manager(c, name) == 4)
    started = time.monotonic()
    with pytest.raises(SendQueueFullException) as err:
        c.infer(name, b"x")
    assert err.value.code == 305 and time.monotonic() - started < 2
    wait_for(lambda: len(got) == 4, timeout=15)
    assert all(code == 0 for code, _, _ in got.values())
    c.release()


def test_send_timeout_is_306(cluster, name):
    handler = cluster.load_inference(echo_config(name, send_timeout=300), "local")
    handler.stop_distribution()
    with pytest.raises(SendQueueTimeoutException) as err:
        cluster.infer(name, b"x")
    assert err.value.code == 306
    handler.start_distribution()
    assert cluster.infer(name, b"x")[0]["shape"] == [1]
    cluster.unload_inference(name)


def test_answer_timeout_is_401_and_the_container_goes_on(cluster, name):
    cluster.load_inference(echo_config(name, wait_queue_timeout=300), "local")
    started = time.monotonic()
    with pytest.raises(ContainerReceiveTimeoutException) as err:
        cluster.infer(name, b"x", {"sleep": 1.5})
    assert err.value.code == 401 and time.monotonic() - started < 1.4
    # The container finishes the late request on its own time; then it serves again.

    def served() -> bool:
        try:
            return cluster.infer(name, b"later")[0]["shape"] == [5]
        except ContainerReceiveTimeoutException:  # still busy with the late one
            return False

    assert wait_for(served, timeout=10)
    cluster.unload_inference(name)


QUEUER = """
import sys, time
from infinibrain import AICluster
c = AICluster(port=int(sys.argv[1]))
for _ in range(3):
    c.infer_async(sys.argv[2], b"x", {"sleep": 0.1}, func=lambda *a: None)
print("queued", flush=True)
time.sleep(8)  # time: the client stays alive (its requests stay queued) while the test works on them
"""


def test_delete_queue_own_other_and_forced(cluster, manager, name):
    handler = cluster.load_inference(echo_config(name), "local")
    handler.stop_distribution()  # everything waits
    got, cb = collector()
    [cluster.infer_async(name, b"x", func=cb) for _ in range(2)]
    child = subprocess.Popen([sys.executable, "-c", QUEUER, str(manager.port), name], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "queued"
        wait_for(lambda: len(cluster.get_queue_info(name, pid=child.pid)) == 3)
        with pytest.raises(PermissionException) as err:
            cluster.delete_queue(name, pid=child.pid)
        assert err.value.code == 308
        # Without force, "all" means this process's own requests.
        left = cluster.delete_queue(name)
        assert {q.pid for q in left} == {child.pid} and len(left) == 3
        wait_for(lambda: len(got) == 2)
        # Ended with their own code and the message that says so (not 306, a timeout).
        assert all(code == 404 and message == "Request deleted from the send wait queue" for code, message, _ in got.values())
        assert cluster.delete_queue(name, pid=child.pid, force_delete=True) == []
        assert cluster.get_queue_info(name) == []
    finally:
        child.kill()
        child.wait()
    handler.start_distribution()
    cluster.unload_inference(name)


def test_requests_of_a_dead_client_leave_the_queue(fresh_manager, name):
    m = fresh_manager(client_timeout_ms=1000).start()
    c = m.client()
    handler = c.load_inference(echo_config(name), "local")
    handler.stop_distribution()
    child = subprocess.Popen([sys.executable, "-c", QUEUER, str(m.port), name], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "queued"
    # Its requests travel on its own connection: they reach the queue soon, not at once.
    wait_for(lambda: len(c.get_queue_info(name)) == 3, timeout=5)
    child.kill()
    child.wait()
    wait_for(lambda: c.get_queue_info(name) == [], timeout=10)
    c.release()


def test_a_deleted_request_is_never_sent_again_by_a_retry_policy(manager, name):
    from infinibrain import AICluster, RequestDeletedException, RetryPolicy

    with AICluster(port=manager.port, retry=RetryPolicy(attempts=5, inference=True)) as c:
        handler = c.load_inference(echo_config(name), "local")
        handler.stop_distribution()
        outcome: list = []

        def call() -> None:
            try:
                c.infer(name, b"x")
            except RequestDeletedException as exc:
                outcome.append(exc)

        t = threading.Thread(target=call)
        t.start()
        wait_for(lambda: len(c.get_queue_info(name)) == 1)
        c.delete_queue(name)
        t.join(10)
        assert outcome and outcome[0].code == 404 and "delete_queue" in str(outcome[0])
        time.sleep(0.5)  # time, not a wait: a request sent again (a first retry comes within 0.3 s) would be queued by then
        assert c.get_queue_info(name) == []  # not sent again
        handler.start_distribution()
        c.unload_inference(name)
