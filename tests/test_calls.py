"""Models call models (issue 26): a container's Connector.infer / infer_image to another
inference through a real manager; the caller's priority travels with it; cycles are refused."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import echo_config, relay_config, wait_for
from infinibrain.errors import InvalidArgumentException, InferenceNameNotFoundException


def test_a_container_calls_another_inference_and_gets_what_the_sdk_gets(cluster, name):
    a, b = name + "a", name + "b"
    cluster.load_inference(relay_config(a), "local")
    cluster.load_inference(relay_config(b), "local")
    cluster.load_inference(echo_config(name + "e"), "local")
    try:
        result, _ = cluster.infer(a, b"hello", {"next": [b]})
        assert result["via"] == [a, b] and result["inner"]["data"] == "hello" and result["inner_board"] == "local"
        result, _ = cluster.infer(a, b"\x01\x02\x03", {"next": [name + "e"], "image": True, "arrays": True})
        rows = result["inner"]["rows"]  # the echo's numpy answer reached the caller, and then us, as an array
        assert isinstance(rows, np.ndarray) and rows.dtype == np.float32 and rows.tolist() == [[1.0], [2.0], [3.0]]
        with pytest.raises(InferenceNameNotFoundException) as err:
            cluster.infer(a, b"x", {"next": ["no-such-inference"]})
        assert err.value.code == 400 and "no-such-inference" in str(err.value)  # the inner call's error, same class
    finally:
        for n in (a, b, name + "e"):
            cluster.unload_inference(n)


def test_a_cycle_of_calls_is_refused_not_deadlocked(cluster, name):
    a, b = name + "a", name + "b"
    cluster.load_inference(relay_config(a), "local")
    cluster.load_inference(relay_config(b), "local")
    try:
        with pytest.raises(InvalidArgumentException) as err:
            cluster.infer(a, b"loop", {"next": [b, a, b]})
        assert "cycle" in str(err.value) and f"{a} -> {b} -> {a}" in str(err.value)
        assert cluster.infer(a, b"ok", {"next": [b]})[0]["via"] == [a, b]  # both serve on
    finally:
        for n in (a, b):
            cluster.unload_inference(n)


def test_a_call_has_the_priority_of_the_request_it_serves(cluster, name):
    a, b = name + "a", name + "b"
    cluster.load_inference(relay_config(a), "local")
    cluster.load_inference(echo_config(b, max_send_num=1), "local")
    try:
        busy = threading.Thread(target=cluster.infer, args=(b, b"busy", {"sleep": 1.5}), daemon=True)
        busy.start()  # b's only slot is taken: a's call waits in b's queue, where its priority shows
        wait_for(lambda: cluster.get_queue_info(b) == [] and in_flight(cluster, b))
        answers: list = []
        caller = threading.Thread(target=lambda: answers.append(cluster.infer(a, b"x", {"next": [b]}, priority=7)[0]), daemon=True)
        caller.start()
        waiting = wait_for(lambda: cluster.get_queue_info(b))
        assert [q.priority for q in waiting] == [7]  # the call, queued with the priority of the request it serves
        caller.join(10)
        busy.join(10)
        assert answers and answers[0]["inner"]["sum"] == sum(b"x")  # then served by b, and answered through a
    finally:
        for n in (a, b):
            cluster.unload_inference(n)


def in_flight(cluster, name: str) -> bool:
    return any(k.startswith(name) for k in cluster.stats()["in_flight"])


def test_a_large_call_passes_through_the_manager_by_name_in_shared_memory(cluster, name):
    """Both containers share this host's /dev/shm with the manager: the caller's data goes
    in a segment of its own, whose name the manager checks (its probe) and passes on."""
    a, e = name + "a", name + "e"
    cluster.load_inference(relay_config(a), "local")
    cluster.load_inference(echo_config(e), "local")
    try:
        data = np.arange(300_000, dtype=np.uint32).astype(np.uint8).tobytes()  # above shm.MIN_BYTES
        before = cluster.stats()["shared_memory"]
        for _ in range(3):  # the segment is reused once each call has ended
            result, _ = cluster.infer(a, data, {"next": [e], "image": True})
            assert result["inner"]["sum"] == sum(data) and result["inner"]["shape"] == [len(data)]
        after = cluster.stats()["shared_memory"]
        assert after["passed"] - before["passed"] >= 3  # the echo read the caller's segment itself: the manager passed the name
    finally:
        for n in (a, e):
            cluster.unload_inference(n)
