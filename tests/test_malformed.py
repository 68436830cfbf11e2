"""Bad frames at every manager port, and the Connector's own checks."""
from __future__ import annotations

import logging
import os
import random
import time

import msgpack
import numpy as np
import pytest
import zmq

from conftest import connect_raw, echo_config, send_until
from infinibrain import protocol as P
from infinibrain.containers import Connector, container_log_util
from infinibrain.errors import ContainerReceiveTimeoutException, InvalidArgumentException


def garbage(rng: random.Random) -> list[bytes]:
    choices = [
        [b""],
        [rng.randbytes(rng.randint(0, 64))],
        [b"m", rng.randbytes(rng.randint(1, 64))],
        [b"m", msgpack.packb([1, 2, 3])],
        [b"m", msgpack.packb({"v": 99, "k": "req"})],
        [b"m", msgpack.packb({"v": 1})],
        [b"m", msgpack.packb({"v": 1, "k": "req"})],  # no client id
        [b"m", msgpack.packb({"v": 1, "k": "req", "cid": "x"})],  # no request number
        [b"m", msgpack.packb({"v": 1, "k": "cmd", "cid": "x", "rid": "1", "cmd": "load_inference", "args": [1]})],
        [b"m", msgpack.packb({"v": 1, "k": "res", "cont": "nobody", "mkey": 5})],
        [b"m", msgpack.packb({"v": 1, "k": "hello", "cont": 17})],
        [b"m", msgpack.packb({"v": 1, "k": "zzz", "cid": "x"})],
        [b"m", msgpack.packb({"v": 1, "k": "req", "cid": "x", "rid": "1", "inf": ["list"], "param": 3})],
    ]
    return rng.choice(choices)


def test_manager_survives_garbage_on_every_port(cluster, manager, name):
    cluster.load_inference(echo_config(name), "local")
    ctx = zmq.Context()
    rng = random.Random(7)
    socks = []
    try:
        for offset, port_name in ((P.INFER_IN, "requests"), (P.MGMT_IN, "management"), (P.CONTAINER_IN, "container-results")):
            s = ctx.socket(zmq.PUB)
            connect_raw(s, f"tcp://127.0.0.1:{manager.port + offset}")
            # Connected once the manager has dropped a probe sent through it.
            probed = cluster.stats()["dropped_by_port"].get(port_name, 0)
            send_until(lambda s=s: s.send(b"probe"),
                       lambda p=port_name, n=probed: cluster.stats()["dropped_by_port"].get(p, 0) > n)
            socks.append(s)
        # SUB and XPUB ports: a peer that sends raw (non-protocol) subscriptions and data.
        for offset in (P.CLIENT_OUT, P.CONTAINER_OUT):
            s = ctx.socket(zmq.XSUB)
            connect_raw(s, f"tcp://127.0.0.1:{manager.port + offset}")
            socks.append(s)
        for i in range(3000):
            s = socks[i % len(socks)]
            frames = garbage(rng)
            if s.type == zmq.XSUB:
                frames = [bytes([rng.choice([0, 1, 2])]) + rng.randbytes(rng.randint(0, 20))]
            s.send_multipart(frames)
            if i % 500 == 0:  # normal traffic keeps flowing during the blast
                assert cluster.infer(name, b"abc")[0]["shape"] == [3]
        # A raw TCP peer that speaks no ZMTP at all.
        import socket

        raw = socket.create_connection(("127.0.0.1", manager.port + P.MGMT_IN))
        raw.sendall(os.urandom(4096))
        raw.close()
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
    assert cluster.infer(name, b"still serving")[0]["shape"] == [13]
    log = manager.log()
    assert "dropped malformed message" in log
    cluster.unload_inference(name)


def test_protocol_decode_refuses_what_is_not_a_message():
    bad = [[], [b"only-topic"], [b"t", b"\xc1"], [b"t", msgpack.packb("str")], [b"t", msgpack.packb({"v": 2, "k": "x"})],
           [b"t", msgpack.packb({"v": 1, "k": 5})]]
    for frames in bad:
        with pytest.raises(P.ProtocolError):
            P.decode(frames)
    msg = P.decode(P.encode(b"t", P.REQUEST, {"rid": "1"}, [b"payload"]))
    assert (msg.topic, msg.kind, msg.header["rid"], msg.payload) == (b"t", "req", "1", [b"payload"])


def test_array_round_trip_and_size_check():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    back = P.array_from(P.array_meta(a), a.tobytes())
    assert back.dtype == a.dtype and back.shape == a.shape and (back == a).all()
    assert not back.flags.writeable  # a view over the received frame, not a copy
    with pytest.raises(P.ProtocolError):
        P.array_from({"dtype": "<f4", "shape": [2, 3, 5]}, a.tobytes())
    with pytest.raises(P.ProtocolError):
        P.array_from({"dtype": "O", "shape": [1]}, b"12345678")
    back = P.unpack_value(P.pack_value({"x": np.float32(1.5), "y": np.arange(3)}))
    assert back["x"] == 1.5 and type(back["x"]) is float  # a numpy scalar is made plain
    assert isinstance(back["y"], np.ndarray) and back["y"].tolist() == [0, 1, 2]  # an array stays one


def test_connector_arguments_and_receive_timeout(monkeypatch):
    for var in ("INFINIBRAIN_HOST", "INFINIBRAIN_PUB_PORT", "INFINIBRAIN_SUB_PORT", "INFINIBRAIN_SUB_NAME", "INFINIBRAIN_CONTAINER"):
        monkeypatch.delenv(var, raising=False)
    cases = [
        (dict(sub_name=None, host_ip="127.0.0.1", pub_port="1", sub_port="2"), "sub_name"),
        (dict(sub_name="a", host_ip=None, pub_port="1", sub_port="2"), "host_ip"),
        (dict(sub_name="a", host_ip="127.0.0.1", pub_port="x", sub_port="2"), "pub_port"),
        (dict(sub_name="a", host_ip="127.0.0.1", pub_port="1", sub_port=None), "sub_port"),
        (dict(context="nope", sub_name="a", host_ip="127.0.0.1", pub_port="1", sub_port="2"), "context"),
    ]
    for kwargs, argument in cases:
        with pytest.raises(InvalidArgumentException) as err:
            Connector(**kwargs)
        assert err.value.code == 100 and argument in str(err.value)
    from conftest import free_base_port

    port = free_base_port()
    conn = Connector(sub_name="a", host_ip="127.0.0.1", pub_port=str(port), sub_port=str(port + 1))
    started = time.monotonic()
    with pytest.raises(ContainerReceiveTimeoutException) as err:
        conn.receive_request(timeout=0.3)
    assert err.value.code == 401 and err.value.message == "receive timeout"
    assert 0.25 < time.monotonic() - started < 3
    conn.close()


def test_container_log_util_carries_the_code(caplog):
    container_log_util.log_setting("test.container", logging.INFO)
    with caplog.at_level(logging.DEBUG):
        container_log_util.debug("hidden below INFO")
        container_log_util.warning("disk almost full", code=42)
        container_log_util.info("plain")
        try:
            raise ValueError("boom")
        except ValueError:
            container_log_util.exception("failed", code=7)
    records = [(r.levelname, r.getMessage(), r.code) for r in caplog.records if r.name == "test.container"]
    assert records == [("WARNING", "disk almost full", 42), ("INFO", "plain", -1), ("ERROR", "failed", 7)]
    assert caplog.records[-1].exc_info is not None
