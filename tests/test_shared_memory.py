"""Large payloads through shared memory (infinibrain/shm.py): real segments in /dev/shm,
a real manager and real process containers."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zmq

from conftest import connected, echo_config, wait_for
from infinibrain import shm
from infinibrain import protocol as P

pytestmark = pytest.mark.skipif(not shm.available(), reason="this host has no writable /dev/shm")

SHAPE = (256, 256, 3)  # 192 kB: above shm.MIN_BYTES


def segments(owner: str) -> list[str]:
    """The data segments of client ``owner`` (not its probe)."""
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(shm.owner_prefix(owner)) and not n.endswith("-probe"))


def shared_counts(cluster) -> dict:
    return cluster.stats()["shared_memory"]


def test_images_in_flight_each_reach_their_own_request(cluster, name):
    cluster.load_inference(echo_config(name, max_send_num=4), "local")
    before = shared_counts(cluster)
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, SHAPE, dtype=np.uint8) for _ in range(24)]
    expected = [int(image.astype(np.int64).sum()) for image in images]
    futures = [cluster.infer_image_future(name, image) for image in images]
    for image in images:  # detached: the caller may change its buffer once the call returns
        image[...] = 0
    assert [f.result(timeout=30)["sum"] for f in futures] == expected
    # Sequential calls reuse the segments: every answer is still its own image's.
    for i in range(1, 6):
        assert cluster.infer_image(name, np.full(SHAPE, i, dtype=np.uint8))["sum"] == i * int(np.prod(SHAPE))
    assert segments(cluster._client.id), "the client made no shared memory segment"
    assert len(segments(cluster._client.id)) <= 24
    after = shared_counts(cluster)
    assert after["passed"] - before["passed"] == 29  # the container read them itself
    assert after["read"] == before["read"]
    cluster.unload_inference(name)


def test_small_payloads_and_bytes_below_the_threshold_go_in_frames(cluster, name):
    cluster.load_inference(echo_config(name), "local")
    before = shared_counts(cluster)
    assert cluster.infer_image(name, np.ones((8, 8, 3), np.uint8))["sum"] == 192
    big = bytes(range(256)) * 1024  # 256 kB of bytes: in_data goes in shared memory too
    result, _ = cluster.infer(name, big)
    assert result["sum"] == sum(range(256)) * 1024 and result["shape"] == [len(big)]
    after = shared_counts(cluster)
    assert after["passed"] - before["passed"] == 1
    cluster.unload_inference(name)


def test_a_container_keeps_its_own_copy_of_an_image(cluster, name):
    """The client reuses a segment once its request ended: a program that keeps an image
    must not see it change."""
    cluster.load_inference(echo_config(name, run_command="python keeper.py"), "local")
    answers = [cluster.infer_image(name, np.full(SHAPE, v, dtype=np.uint8)) for v in (1, 2, 3)]
    assert [a["sum"] for a in answers] == [v * int(np.prod(SHAPE)) for v in (1, 2, 3)]
    assert answers[-1]["firsts"] == [1, 2, 3]
    assert len(segments(cluster._client.id)) >= 1
    cluster.unload_inference(name)


def test_a_container_that_cannot_read_shared_memory_gets_the_bytes(cluster, name):
    """Its Connector finds no probe (as in a Docker container with its own /dev/shm): the
    manager reads the segment and sends the bytes in a frame."""
    cfg = echo_config(name, run_command="env INFINIBRAIN_SHM_PROBE=infinibrain-1-nowhere-probe python echo.py")
    cluster.load_inference(cfg, "local")
    before = shared_counts(cluster)
    images = [np.full(SHAPE, v, dtype=np.uint8) for v in range(1, 9)]
    futures = [cluster.infer_image_future(name, image) for image in images]
    assert [f.result(timeout=30)["sum"] for f in futures] == [v * int(np.prod(SHAPE)) for v in range(1, 9)]
    after = shared_counts(cluster)
    assert after["read"] - before["read"] == 8 and after["passed"] == before["passed"]
    cluster.unload_inference(name)


def test_segments_are_removed_when_the_client_is_released(manager, name):
    c = manager.client()
    try:
        c.load_inference(echo_config(name), "local")
        assert c.infer_image(name, np.ones(SHAPE, np.uint8))["sum"] == int(np.prod(SHAPE))
        owner = c._client.id
        assert segments(owner) and os.path.exists(os.path.join(shm.SHM_DIR, shm.probe_name(owner)))
        c.unload_inference(name)
    finally:
        c.release()
    assert segments(owner) == [] and not os.path.exists(os.path.join(shm.SHM_DIR, shm.probe_name(owner)))


def test_segments_of_a_client_that_died_are_removed_by_the_next(manager, name, tmp_path):
    script = tmp_path / "dies.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        import numpy as np
        from infinibrain import AICluster
        c = AICluster(port={manager.port})
        print(c._client.id, flush=True)
        print(c.infer_image({name!r}, np.ones({SHAPE!r}, np.uint8))["sum"], flush=True)
        os._exit(0)  # no release, no exit handlers: its segments stay behind
    """))
    c = manager.client()
    try:
        c.load_inference(echo_config(name), "local")
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
        owner, total = out.stdout.split()
        assert int(total) == int(np.prod(SHAPE)), out.stderr
        assert segments(owner), "the dead client left nothing to clean"
        assert shm.sweep() >= 1
        assert segments(owner) == []
        c.unload_inference(name)
    finally:
        c.release()


class RawClient:
    """A client speaking the protocol by hand, to send what the SDK never would."""

    def __init__(self, port: int, cid: str) -> None:
        self.cid = cid
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.connect(f"tcp://127.0.0.1:{port + P.INFER_IN}")
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.subscribe(P.client_topic(cid))
        self.sub.connect(f"tcp://127.0.0.1:{port + P.CLIENT_OUT}")

    def send(self, kind: str, header: dict) -> None:
        P.send(self.pub, P.encode(P.TOPIC_MANAGER, kind, {"cid": self.cid, "pid": os.getpid(), **header}))

    def next(self, kind: str, timeout: float = 10.0) -> P.Message | None:
        """The next message of ``kind`` within ``timeout`` s (others dropped), else None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sub.poll(50):
                msg = P.decode(P.recv(self.sub))
                if msg.kind == kind:
                    return msg
        return None

    def hello(self, probe: str | None) -> dict:
        def answered():
            self.send(P.HELLO, {"path": "infer", **({"shm": probe} if probe else {})})
            return self.next(P.HELLO_ACK, timeout=0.3)
        return wait_for(answered, timeout=10).header

    def infer(self, rid: str, name: str, ref: list) -> tuple[dict, object]:
        self.send(P.REQUEST, {"rid": rid, "inf": name, "param": {}, "arr": None, "shm": ref})
        msg = self.next(P.RESULT)
        assert msg is not None, f"request {rid} was never answered"
        return msg.header, (P.unpack_value(msg.payload[0]) if msg.payload else None)

    def close(self) -> None:
        self.pub.close(linger=0)
        self.sub.close(linger=0)
        self.ctx.term()


def test_segments_are_read_only_for_a_client_that_proved_it_and_named_its_own(cluster, manager, name):
    cluster.load_inference(echo_config(name), "local")
    raw = RawClient(manager.port, f"{os.getpid()}-rawtest")
    probe = None
    victim, own = shm.Pool("99999999-victim"), shm.Pool(raw.cid)
    try:
        victims = victim.take(1 << 16).write(np.ones(1 << 16, np.uint8))  # another client's segment, on this host
        assert raw.hello(None)["shm"] is False  # has no probe: may not name segments
        header, _ = raw.infer("1", name, victims)
        assert header["code"] == 999 and "cannot read this client's probe" in header["detail"]

        probe = shm.Probe(shm.probe_name(raw.cid), raw.cid)
        assert raw.hello(probe.name)["shm"] is True
        header, _ = raw.infer("2", name, victims)
        assert header["code"] == 999 and "not a segment of this client" in header["detail"]

        header, result = raw.infer("3", name, own.take(1 << 16).write(np.full(1 << 16, 3, np.uint8)))
        assert header["code"] == 0 and result["sum"] == 3 << 16

        gone = own.take(1 << 17).write(np.ones(1 << 17, np.uint8))
        own.close()  # removed before the container opens it: the request still ends, with 999
        header, _ = raw.infer("4", name, gone)
        assert header["code"] == 999 and "shared memory" in header["detail"]
    finally:
        raw.close()
        if probe is not None:
            probe.close()
        victim.close()
        own.close()
    assert cluster.infer_image(name, np.ones(SHAPE, np.uint8))["sum"] == int(np.prod(SHAPE))
    cluster.unload_inference(name)


def test_pool_reuses_segments_within_its_limit(tmp_path):
    pool = shm.Pool(f"{os.getpid()}-unit", limit=4 << 20)
    try:
        a = pool.take(1 << 20)
        assert a is not None and a.size >= 1 << 20
        pool.give(a)
        assert pool.take((1 << 20) - 100) is a  # reused, not made anew
        b = pool.take(2 << 20)
        assert b is not None and pool.take(2 << 20) is None  # over the limit: a frame instead
        pool.give(b)
        c = pool.take(3 << 20)  # room made by dropping the unused one
        assert c is not None and not os.path.exists(os.path.join(shm.SHM_DIR, b.name))
        reader = shm.Reader()
        ref = c.write(np.arange(100, dtype=np.uint8))
        assert bytes(reader.view(ref)) == bytes(range(100))
        with pytest.raises(shm.ShmError):
            reader.view([c.name, c.size + 1])  # more than the segment holds
    finally:
        pool.close()
    assert segments(f"{os.getpid()}-unit") == []


@pytest.mark.parametrize("ref", [
    None, [], ["infinibrain-1-a-1"], ["infinibrain-1-a-1", 0], ["infinibrain-1-a-1", "9"], ["../../etc/passwd", 9],
    ["infinibrain-1-a-probe", 9], ["infinibrain-1-a-1/../x", 9], ["other-1-a-1", 9],
])
def test_a_reader_opens_only_names_of_segments(ref):
    with pytest.raises(shm.ShmError):
        shm.Reader().view(ref)


def test_containers_a_restarted_manager_adopts_keep_reading_shared_memory(fresh_manager, name):
    """The manager's probe keeps its name across a restart (the adopted containers'
    environment names it) and holds the new manager's token, which they read again."""
    m = fresh_manager(boards=("local",)).start()
    with connected(m) as c:
        c.load_inference(echo_config(name), "local")
        pid = c.infer_image(name, np.ones(SHAPE, np.uint8))["pid"]
        assert shared_counts(c)["passed"] == 1
    m.kill()  # its probe stays behind, with the old token
    m.start()
    with connected(m) as c:
        wait_for(lambda: all(s.connect_status == "connected" for s in c.get_container_status(name)), 30)
        answer = c.infer_image(name, np.full(SHAPE, 2, np.uint8))
        assert answer["pid"] == pid and answer["sum"] == 2 * int(np.prod(SHAPE))  # adopted, not started again
        assert shared_counts(c) == {"passed": 1, "read": 0}
        c.unload_inference(name)


def test_sweep_removes_only_what_owners_that_are_gone_left(tmp_path):
    """An owner is alive while it holds its probe's lock, whatever its pid says (a client in
    another pid namespace sharing /dev/shm has pids that mean nothing here)."""
    live_owner, gone_owner = "12345-liveowner", "12345-goneowner"  # one pid, as two namespaces may give
    live = shm.Probe(shm.probe_name(live_owner), live_owner)
    made = [f"infinibrain-{live_owner}-1", f"infinibrain-{gone_owner}-1", f"infinibrain-{gone_owner}-probe",
            "infinibrain-manager-1-probe", f"infinibrain-{gone_owner}-2"]
    for n in made:
        with open(os.path.join(shm.SHM_DIR, n), "wb") as f:
            f.write(b"x")
    try:
        shm.sweep()
        left = {n for n in made + [live.name] if os.path.exists(os.path.join(shm.SHM_DIR, n))}
        assert left == {f"infinibrain-{live_owner}-1", live.name}
    finally:
        live.close()
        for n in made:
            if os.path.exists(os.path.join(shm.SHM_DIR, n)):
                os.unlink(os.path.join(shm.SHM_DIR, n))
    assert not os.path.exists(os.path.join(shm.SHM_DIR, live.name))
