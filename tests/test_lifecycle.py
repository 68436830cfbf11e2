"""Containers dying, the manager stopping, being killed and coming back, and the registry."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from conftest import echo_config, in_manager, wait_for
from infinibrain import ContainerDisconnectException, ContainerHandler, InvalidArgumentException
from infinibrain.errors import ConnectionFailedException, SocketConnectionException


def test_container_dying_mid_request_is_402_and_114(cluster, name):
    events = []
    cluster.set_callback(manage_callback=lambda code, msg, cmd, result: events.append((code, msg, cmd, result)))
    cluster.load_inference(echo_config(name), "all")
    started = time.monotonic()
    with pytest.raises(ContainerDisconnectException) as err:
        cluster.infer(name, b"x", {"crash": True})
    assert err.value.code == 402 and time.monotonic() - started < 10
    wait_for(lambda: any(e[0] == 114 for e in events))
    code, msg, cmd, info = next(e for e in events if e[0] == 114)
    assert msg == f"Inference {name} became unsubscribe state" and cmd == "unsubscribe"
    assert info["inference_name"] == name and info["suffix_name"].startswith(name)
    # The other replica keeps serving.
    assert cluster.infer(name, b"ok")[0]["board"] in ("local", "b2")
    dead = [s for s in cluster.get_container_status(name) if s.connect_status == "disconnected"]
    assert len(dead) == 1 and dead[0].status.startswith("exited")
    # start() brings the dead one back.
    handler = next(h for h in cluster.get_container_handler(name) if h.suffix_name == dead[0].suffix_name)
    assert handler.start().connect_status == "connected"
    cluster.unload_inference(name)


def test_registrations_survive_sigterm_and_sigkill(fresh_manager, name):
    m = fresh_manager().start()
    c = m.client()
    c.load_inference(echo_config(name), "all")
    c.get_container_handler(name)[1].stop_distribution()
    pids = {c.infer(name, b"x")[0]["pid"] for _ in range(6)}
    c.release()

    assert m.stop() == 0  # clean stop: containers stopped with it
    assert "manager stopped" in m.log()
    for pid in pids:
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z")
    m.start()
    c = m.client()
    handlers = c.get_container_handler(name)
    assert sorted(h.allocated_coprocessor for h in handlers) == ["b2", "local"]
    wait_for(lambda: all(s.connect_status == "connected" for s in c.get_container_status(name)), timeout=20)
    served = {c.infer(name, b"x")[0]["board"] for _ in range(6)}
    assert served == {"b2"}  # distribution off on "local" was remembered
    pids = {r["pid"] for r in (c.infer(name, b"x")[0] for _ in range(3))}
    c.release()

    m.kill()  # SIGKILL: containers keep running and are adopted
    m.start()
    c = m.client()
    wait_for(lambda: all(s.connect_status == "connected" for s in c.get_container_status(name)), timeout=20)
    assert {c.infer(name, b"x")[0]["pid"] for _ in range(3)} == pids  # the same processes, not new ones
    assert "adopted" in m.log()
    c.unload_inference(name)
    c.release()


def test_client_reports_112_113_and_carries_on(fresh_manager, name):
    m = fresh_manager(heartbeat_interval_ms=200).start()
    c = m.client()
    events = []
    c.set_callback(manage_callback=lambda code, msg, cmd, result: events.append((code, msg, cmd)))
    c.load_inference(echo_config(name), "local")
    assert c.infer(name, b"x")[0]["shape"] == [1]
    m.kill()
    wait_for(lambda: any(e[0] == 112 for e in events), timeout=10)
    assert events[-1] == (112, "socket connection disconnected", "keepalive")
    with pytest.raises(ConnectionFailedException) as err:
        c.infer(name, b"x")
    assert err.value.code == 111
    m.start()
    wait_for(lambda: any(e[0] == 113 for e in events), timeout=15)
    assert events[-1] == (113, "socket connection connected", "keepalive")
    wait_for(lambda: c.get_container_status(name)[0].connect_status == "connected", timeout=20)
    assert c.infer(name, b"again")[0]["shape"] == [5]  # the same AICluster object works again
    c.unload_inference(name)
    c.release()


def test_requests_in_flight_when_the_manager_dies_end_with_an_error(fresh_manager, name):
    m = fresh_manager(heartbeat_interval_ms=200).start()
    c = m.client()
    c.load_inference(echo_config(name), "local")
    got = []
    for _ in range(3):
        c.infer_async(name, b"x", {"sleep": 3}, func=lambda code, *rest: got.append(code))
    wait_for(lambda: in_manager(c, name) == 3)  # all three reached the manager (sent on to the container or queued)
    m.kill()
    wait_for(lambda: len(got) == 3, timeout=10)
    assert got == [402, 402, 402]
    c.release()


def test_unreachable_manager_is_110_within_the_timeout():
    from conftest import free_base_port
    from infinibrain import AICluster

    started = time.monotonic()
    with pytest.raises(SocketConnectionException) as err:
        AICluster(port=free_base_port(), timeout=1.0)
    assert err.value.code == 110 and time.monotonic() - started < 5


def test_connect_aicluster_and_release(fresh_manager):
    m = fresh_manager().start()
    c = m.client()
    assert c.connect_aicluster() is None
    m.kill()
    with pytest.raises(SocketConnectionException):
        c.connect_aicluster()
    c.release()
    with pytest.raises(ConnectionFailedException):
        c.get_container_handler()


def test_reload_from_the_inference_config_file(cluster, manager, name):
    cluster.load_inference(echo_config(name, max_send_num=2), "local")
    path = manager.state_dir / "inferences" / f"{name}.json"
    data = json.loads(path.read_text())
    assert data["name"] == name and data["config"]["max_send_num"] == 2 and "local" in data["boards"]
    data["config"]["max_send_num"] = 7
    path.write_text(json.dumps(data))
    reloaded = cluster.reload_inference(name)
    assert [type(h) for h in reloaded] == [ContainerHandler] and reloaded[0].max_send_num == 7  # always a list
    assert cluster.infer(name, b"x")[0]["shape"] == [1]

    path.write_text("{ not json")
    with pytest.raises(InvalidArgumentException) as err:
        cluster.reload_inference(name)
    assert err.value.code == 206
    data["name"] = "someone-else"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidArgumentException) as err:
        cluster.reload_inference(name)
    assert err.value.code == 207
    data["name"] = name
    data["config"]["max_send_num"] = -1
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidArgumentException) as err:
        cluster.reload_inference(name)
    assert err.value.code == 207 and "max_send_num" in str(err.value)
    path.unlink()
    with pytest.raises(InvalidArgumentException) as err:
        cluster.reload_inference(name)
    assert err.value.code == 205
    cluster.unload_inference(name)


def test_one_dead_path_is_111_naming_it():
    """A peer that answers the management path's hello but not the inference path's."""
    import zmq

    from conftest import free_base_port
    from infinibrain import AICluster
    from infinibrain import protocol as P

    port = free_base_port()
    ctx = zmq.Context()
    mgmt = ctx.socket(zmq.SUB)
    mgmt.subscribe(b"")
    mgmt.bind(f"tcp://127.0.0.1:{port + P.MGMT_IN}")
    out = ctx.socket(zmq.PUB)
    out.bind(f"tcp://127.0.0.1:{port + P.CLIENT_OUT}")
    stop = threading.Event()

    def half_manager() -> None:  # the inference port (port+0) is never bound
        while not stop.is_set():
            if mgmt.poll(50):
                msg = P.decode(mgmt.recv_multipart())
                if msg.kind == P.HELLO:
                    out.send_multipart(P.encode(P.client_topic(msg.header["cid"]), P.HELLO_ACK,
                                                {"path": msg.header["path"], "mid": "half", "hb": 0.5}))

    t = threading.Thread(target=half_manager, daemon=True)
    t.start()
    try:
        with pytest.raises(ConnectionFailedException) as err:
            AICluster(port=port, timeout=1.5)
        assert err.value.code == 111 and f"inference port {port}" in str(err.value)
    finally:
        stop.set()
        t.join(5)
        mgmt.close(0)
        out.close(0)
        ctx.term()
