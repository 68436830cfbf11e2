"""Synchronous inference answers come straight to the calling thread's own socket.

``infer`` and ``infer_image`` send their request with the tag of a SUB socket the calling
thread owns; the manager publishes the answer on that socket's topic, so the thread
receives it itself instead of through the SDK's I/O thread (docs/DECISIONS.md,
"Synchronous answers"). Checked here with real sockets: where answers go, that threads
never get each other's, the limit on sockets per AICluster, ended threads' sockets, and a
request that ends with 401 on a thread's socket.
"""
from __future__ import annotations

import threading
import time

import pytest
import zmq

from conftest import connected, echo_config, in_manager, wait_for
from infinibrain import _direct
from infinibrain import protocol as P
from infinibrain.errors import InfinibrainException


def _listen(port: int, topic: bytes) -> zmq.Socket:
    """A raw SUB socket on the manager's client-out port."""
    s = zmq.Context.instance().socket(zmq.SUB)
    s.linger = 0
    s.subscribe(topic)
    s.connect(f"tcp://127.0.0.1:{port + P.CLIENT_OUT}")
    return s


def _thread_topic(c, name: str) -> bytes:
    """The topic of this thread's own answer socket (made by a first synchronous call). A
    raw listener may subscribe to exactly it (a prefix of several clients' or threads'
    topics is refused: no one receives another's answers)."""
    c.infer(name, b"first", {})
    return P.reply_topic(c._client.id, c._client._directs._mine.reply.tag)


def _results(sock: zmq.Socket, seconds: float) -> list[str]:
    """Request numbers of the RESULT messages ``sock`` receives within ``seconds``."""
    rids = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if sock.poll(50):
            msg = P.decode(sock.recv_multipart())
            if msg.kind == P.RESULT:
                rids.append(str(msg.header["rid"]))
    return rids


def test_answers_go_to_the_calling_threads_socket(manager, name):
    with connected(manager) as c:
        c.load_inference(echo_config(name), "all")
        client = c._client
        main = _listen(manager.port, P.client_topic(client.id))
        threads = _listen(manager.port, _thread_topic(c, name))
        try:
            # Both raw listeners join the manager's PUB socket before anything is measured (a
            # SUB socket misses what is published before its subscription arrives).
            wait_for(lambda: c.infer(name, b"j", {})[1].request_no in _results(threads, 0.3), timeout=10)
            # Positive control: an _async answer goes to the client's own topic.
            wait_for(lambda: _async_seen(c, name, main), timeout=10)
            rids = []
            for i in range(5):
                result, response = c.infer(name, bytes([i]), {"i": i})
                assert result["param"] == {"i": i}
                rids.append(response.request_no)
            seen_threads = _results(threads, 1.0)
            seen_main = _results(main, 0.2)
        finally:
            main.close()
            threads.close()
        assert set(rids) <= set(seen_threads), "synchronous answers go to the thread's topic"
        assert not set(rids) & set(seen_main), "and not through the client's topic"
        c.unload_inference(name)


def _async_seen(c, name: str, sock: zmq.Socket) -> bool:
    """Whether the answer to one ``infer_async`` call reaches ``sock``."""
    done = threading.Event()
    rid = c.infer_async(name, b"a", {}, func=lambda *a: done.set())
    assert done.wait(10)
    return rid in _results(sock, 0.3)


def test_threads_get_their_own_answers_only(manager, name):
    with connected(manager) as c:
        c.load_inference(echo_config(name, max_send_num=4), "all")
        wrong: list[tuple] = []

        def work(t: int) -> None:
            for i in range(25):
                result, response = c.infer(name, b"x", {"t": t, "i": i})
                if result["param"] != {"t": t, "i": i}:
                    wrong.append((t, i, result["param"]))

        workers = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not any(w.is_alive() for w in workers)
        assert wrong == []
        assert len(c._client._directs.sockets) == 6
        c.unload_inference(name)


def test_socket_limit_and_ended_threads(manager, name, monkeypatch):
    monkeypatch.setattr(_direct, "DIRECT_SOCKETS", 2)
    with connected(manager) as c:
        c.load_inference(echo_config(name, max_send_num=4), "all")
        answers: list[dict] = []

        def work(t: int) -> None:
            for i in range(10):
                answers.append(c.infer(name, b"x", {"t": t, "i": i})[0]["param"])

        workers = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        # Two threads had sockets; the other two were answered through the I/O thread.
        assert sorted((a["t"], a["i"]) for a in answers) == [(t, i) for t in range(4) for i in range(10)]
        assert len(c._client._directs.sockets) == 2
        # A new thread's socket replaces those of threads that ended.
        late = threading.Thread(target=work, args=(9,))
        late.start()
        late.join(60)
        directs = c._client._directs.sockets
        assert len(directs) == 1 and directs[0].thread is late
        c.unload_inference(name)


def test_a_late_answer_never_matches_the_next_call(manager, name):
    with connected(manager) as c:
        c.load_inference(echo_config(name, wait_queue_timeout=300, max_send_num=2), "all")
        started = time.monotonic()
        with pytest.raises(InfinibrainException) as err:
            c.infer(name, b"x", {"sleep": 1.0, "n": "slow"})
        assert err.value.code == 401 and time.monotonic() - started < 5
        # The next call on this thread's socket gets its own answer, not the slow one's.
        result, _ = c.infer(name, b"y", {"n": "next"})
        assert result["param"] == {"n": "next"}
        assert len(c._client._directs.sockets) == 1
        c.unload_inference(name)


def test_release_ends_a_waiting_synchronous_call(manager, name):
    c = manager.client()
    c.load_inference(echo_config(name), "all")
    c.infer(name, b"warm", {})
    outcome: list[int] = []

    def call() -> None:
        try:
            c.infer(name, b"x", {"sleep": 1.5})
            outcome.append(0)
        except InfinibrainException as exc:
            outcome.append(exc.code)

    t = threading.Thread(target=call)
    t.start()
    wait_for(lambda: in_manager(c, name) == 1)  # the call waits: its request has reached the manager
    c.release()
    t.join(5)
    assert not t.is_alive() and outcome == [111]
    with connected(manager) as other:
        wait_for(lambda: in_manager(other, name) == 0)  # the released call's request has ended in its container
        other.unload_inference(name)


def _headers(sock: zmq.Socket, kind: str, seconds: float) -> list[dict]:
    """Headers of the ``kind`` messages ``sock`` receives within ``seconds``."""
    found = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if sock.poll(50):
            msg = P.decode(sock.recv_multipart())
            if msg.kind == kind:
                found.append(msg.header)
    return found


def test_a_result_alone_comes_without_the_response_fields(manager, name):
    """infer_image wants the result only (protocol "lean"): its answer carries no
    InferenceResponse fields; infer's carries them, and an error's always does."""
    import numpy as np

    with connected(manager) as c:
        c.load_inference(echo_config(name), "all")
        threads = _listen(manager.port, _thread_topic(c, name))
        try:
            # The thread's socket proves itself and the raw listener joins first.
            wait_for(lambda: c.infer(name, b"j", {})[1].request_no in _results(threads, 0.3), timeout=10)
            _headers(threads, P.RESULT, 0.3)
            c.infer_image(name, np.zeros((2, 2), np.uint8), {"n": 2})
            result, response = c.infer(name, b"x", {"n": 3})
            with pytest.raises(InfinibrainException):
                c.infer_image(name, np.zeros((2, 2), np.uint8), {"bad_result": True})
            answers = _headers(threads, P.RESULT, 1.0)
        finally:
            threads.close()
        assert len(answers) == 3, answers
        image, full, failed = answers
        assert "resp" not in image and image["code"] == 0
        assert full["resp"]["time_stamp"] and [s[0] for s in response.time_stamp][:2] == ["client_send", "manager_receive"]
        assert failed["code"] == 999 and failed["resp"]["time_stamp"]
        c.unload_inference(name)


def test_a_slow_request_is_acknowledged_once_with_its_deadline(manager, name):
    """A request not answered within deadlines.ACK_DELAY is acknowledged to its client, once,
    with the time it may still take (the client then waits that long instead of
    ACK_TIMEOUT); one answered sooner is not acknowledged at all."""
    with connected(manager) as c:
        c.load_inference(echo_config(name, max_send_num=1), "all")
        mine = _listen(manager.port, P.client_topic(c._client.id))
        try:
            wait_for(lambda: _async_seen(c, name, mine), timeout=10)  # the raw listener has joined
            fast = c.infer_future(name, b"x", {})
            slow = [c.infer_future(name, b"x", {"sleep": 0.4}) for _ in range(2)]  # the second waits in the queue
            fast.result(10)
            for f in slow:
                f.result(10)
            acks = _headers(mine, P.ACK, 0.5)
        finally:
            mine.close()
        rids = [str(a["rid"]) for a in acks]
        assert len(rids) == 2 and len(set(rids)) == 2, acks  # each slow one once, the fast one never
        assert all(isinstance(a["timeout"], (int, float)) and a["timeout"] > 0 for a in acks)
        c.unload_inference(name)
