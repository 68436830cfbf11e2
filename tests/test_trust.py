"""Trust only what a connection proves (issue 25), against a real CURVE manager and real
containers, with real peers that hold real keys and try what an outsider would: answer
another container's requests, unsubscribe it, subscribe to everything, name another
client's shared memory, manage with an inference-only key, read the manager's key from a
container, and flood the manager. docs/RELIABILITY.md's threat model names each test."""
from __future__ import annotations

import multiprocessing as mp
import os
import pwd
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from conftest import SCRIPTS, connected, echo_config, manager_stats, wait_for
from loadgen import flood, rss
from infinibrain import AICluster, ContainerConfig, InferenceModulesConfig, InvalidArgumentException, security
from infinibrain import protocol as P
from infinibrain.errors import InfinibrainException
from test_security import CurveSetup

TEST_USER = "infinibrain-test"  # made by `make test`'s set-up (scripts/prereqs.sh)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A CURVE key set: the manager, client1 (manages), client2 (manages: a second
    application, another user's), reader (inference only: curve_client_keys/infer/)."""
    keys = CurveSetup(tmp_path / "curve", extra=("client2", "reader"))
    (keys.allowed / "client2.key").write_text((keys.dir / "keys" / "client2.key").read_text())
    (keys.allowed / "infer").mkdir()
    (keys.allowed / "infer" / "reader.key").write_text((keys.dir / "keys" / "reader.key").read_text())
    for key, value in keys.env("client1").items():
        monkeypatch.setenv(key, value)
    return keys


def curve_keys(setup: CurveSetup, public: str, secret: str) -> security.CurveKeys:
    return security.CurveKeys(security.load_public(setup.server_key), public.encode(), secret.encode())


def client_keys(setup: CurveSetup, name: str) -> security.CurveKeys:
    public, secret = security.load_pair(setup.dir / "keys" / f"{name}.key_secret")
    return security.CurveKeys(security.load_public(setup.server_key), public, secret)


def raw(kind: int, port: int, keys: security.CurveKeys, subscribe: tuple[bytes, ...] = ()) -> zmq.Socket:
    s = zmq.Context.instance().socket(kind)
    s.linger = 0
    security.arm_client(s, keys)
    for topic in subscribe:
        s.subscribe(topic)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def drain(sock: zmq.Socket, seconds: float) -> list[list[bytes]]:
    got = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if sock.poll(50):
            got.append(sock.recv_multipart())
    return got


def dropped(c: AICluster, port: str) -> int:
    return manager_stats(c)["dropped_by_port"].get(port, 0)


# ---- 1. a result counts only from the container that holds its request ------------------------------


def test_a_forger_with_another_containers_key_cannot_answer_end_or_wedge_a_container(setup, fresh_manager, name):
    m = fresh_manager(boards=("local",), **setup.manager_settings()).start()
    with connected(m) as c:
        c.load_inference(echo_config(name), "local")
        c.load_inference(echo_config(name + "x"), "local")  # the container whose key the forger stole
        stolen = c.infer(name + "x", b"x")[0]["env"]
        victim = c.infer(name, b"x")[0]["env"]["INFINIBRAIN_INSTANCE"]
        keys = curve_keys(setup, stolen[security.ENV_PUBLIC_KEY], stolen[security.ENV_SECRET_KEY])
        own = P.container_topic(stolen["INFINIBRAIN_INSTANCE"], "echo")
        base = dropped(c, "container-out")
        spy = raw(zmq.SUB, m.port + P.CONTAINER_OUT, keys, (b"", b"q/", P.container_topic(victim, "echo"), own))
        # Its subscriptions for the victim are refused (counted); the one to its own topic is not.
        wait_for(lambda: dropped(c, "container-out") >= base + 3)
        c.infer(name + "x", b"x")
        seen = drain(spy, 0.5)
        assert seen and all(f[0] == own for f in seen)  # positive control: it does hear its own requests
        keys_seen = [msgpack.unpackb(f[1])["mkey"] for f in seen]
        forger = raw(zmq.PUB, m.port + P.CONTAINER_IN, keys)
        forged_before = dropped(c, "container-results")

        def forge() -> None:  # results for every request key near the ones it saw, and an unsubscription
            for mkey in range(min(keys_seen) - 50, max(keys_seen) + 400):
                P.send(forger, P.encode(P.TOPIC_MANAGER, P.RESULT, {"cont": victim, "mkey": mkey, "code": 0},
                                        [P.pack_value({"forged": True})]))
            spy.unsubscribe(P.container_topic(victim, "echo"))

        results = []
        for _ in range(20):
            forge()
            results.append(c.infer(name, b"real", {"sleep": 0.01})[0])
        assert all("forged" not in r and r["env"]["INFINIBRAIN_INSTANCE"] == victim for r in results)
        assert dropped(c, "container-results") > forged_before  # the forged results were refused and counted
        row = c.get_container_status(name)[0]
        assert (row.connect_status, row.operate) == ("connected", "Free")  # not wedged
        assert not [f for f in drain(spy, 0.3) if f[0] != own]  # it never received a request of the victim
        spy.close()
        forger.close()
        c.unload_inference(name)
        c.unload_inference(name + "x")


# ---- 3. results and events only to their owner; shared memory bound to the key --------------------------


def test_a_client_subscribed_to_everything_receives_nothing_of_another(setup, fresh_manager, name):
    m = fresh_manager(boards=("local",), **setup.manager_settings()).start()
    with connected(m) as c:
        c.load_inference(echo_config(name), "local")
        c.infer(name, b"x")  # the calling thread's own answer socket exists
        mine = c._client.id
        thread_tag = c._client._directs._mine.reply.tag
        base = dropped(c, "client-out")
        snoop = raw(zmq.SUB, m.port + P.CLIENT_OUT, client_keys(setup, "client2"),
                    (b"", b"c/", b"t/", P.client_topic(mine), P.reply_topic(mine, thread_tag), P.TOPIC_HEARTBEAT))
        wait_for(lambda: dropped(c, "client-out") >= base + 5)  # five refused: all but the heartbeats
        done = []
        for i in range(10):
            c.infer(name, b"sync", {"i": i})
            c.infer_async(name, b"async", {"i": i}, func=lambda *a: done.append(a))
        wait_for(lambda: len(done) == 10)
        got = drain(snoop, 1.0)
        assert got, "positive control: the snoop is connected and hears the heartbeats it may hear"
        assert {f[0] for f in got} == {P.TOPIC_HEARTBEAT}, {f[0] for f in got}
        snoop.close()
        c.unload_inference(name)


def test_naming_another_clients_id_or_segment_is_refused(setup, fresh_manager, name):
    m = fresh_manager(boards=("local",), **setup.manager_settings()).start()
    with connected(m) as c:
        c.load_inference(echo_config(name), "local")
        image = np.full((256, 256, 3), 7, np.uint8)  # 196 kB: through shared memory
        assert c.infer_image(name, image)["sum"] == int(image.sum())
        assert manager_stats(c)["shared_memory"]["passed"] + manager_stats(c)["shared_memory"]["read"] >= 1
        victim = c._client.id
        segment = next(p.name for p in Path("/dev/shm").glob(f"infinibrain-{victim}-*") if not p.name.endswith("probe"))
        keys = client_keys(setup, "client2")
        thief_id = f"{os.getpid()}-thief00000"
        inbox = raw(zmq.SUB, m.port + P.CLIENT_OUT, keys, (P.client_topic(thief_id), P.client_topic(victim)))
        out = raw(zmq.PUB, m.port + P.INFER_IN, keys)
        base = dropped(c, "requests")

        def ask(cid: str, rid: str) -> None:
            P.send(out, P.encode(P.TOPIC_MANAGER, P.REQUEST, {"cid": cid, "pid": 1, "rid": rid, "inf": name, "param": {},
                                                              "arr": {"dtype": "|u1", "shape": [256, 256, 3]},
                                                              "shm": [segment, image.nbytes]}))

        # Its own id, the victim's segment: refused (999), the data never read for it.
        answers = []

        def asked() -> bool:
            ask(thief_id, "1")
            answers.extend(f for f in drain(inbox, 0.2) if f[0] == P.client_topic(thief_id))
            return bool(answers)

        wait_for(asked)
        header = msgpack.unpackb(answers[0][1])
        assert header["code"] == 999 and len(answers[0]) == 2  # no result frame: nothing of the victim's
        # The victim's id: its messages are dropped and counted, nothing answers them.
        ask(victim, "2")
        wait_for(lambda: dropped(c, "requests") > base)
        assert not [f for f in drain(inbox, 0.5) if f[0] == P.client_topic(victim)]
        assert c.infer_image(name, image)["sum"] == int(image.sum())  # the victim is served as before
        inbox.close()
        out.close()
        c.unload_inference(name)


# ---- 4. roles for application keys ---------------------------------------------------------------------------


def test_an_inference_only_key_runs_inference_and_reads_but_cannot_manage(setup, fresh_manager, name, monkeypatch, tmp_path):
    m = fresh_manager(boards=("local",), **setup.manager_settings()).start()
    with connected(m) as c:
        c.load_inference(echo_config(name), "local")
    for key, value in setup.env("reader").items():
        monkeypatch.setenv(key, value)
    source = tmp_path / "f.txt"
    source.write_text("x")
    with connected(m) as reader:
        assert reader.infer(name, b"x")[0]["shape"] == [1]
        assert reader.get_container_status(name)[0].connect_status == "connected"
        assert reader.get_queue_info(name) == []
        refused = {
            "load_inference": lambda: reader.load_inference(echo_config(name + "y"), "local"),
            "unload_inference": lambda: reader.unload_inference(name),
            "put_file": lambda: reader.put_file(name, {"file": str(source)}),
            "delete_queue": lambda: reader.delete_queue(name, force_delete=True),
            "stop_distribution": lambda: reader.get_container_handler(name)[0].stop_distribution(),
        }
        for api, call in refused.items():
            with pytest.raises(InfinibrainException) as err:
                call()
            assert err.value.code == 110 and "'infer'" in err.value.detail, (api, err.value)
        assert reader.infer(name, b"still")[0]["shape"] == [5]
    monkeypatch.undo()
    for key, value in setup.env("client1").items():
        monkeypatch.setenv(key, value)
    with connected(m) as c:
        assert [h.name for h in c.get_container_handler()] == [name]  # nothing changed
        c.unload_inference(name)


# ---- a process container as another user ---------------------------------------------------------------------


def test_a_process_container_run_as_another_user_cannot_read_the_managers_key(setup, fresh_manager, name):
    try:
        uid = pwd.getpwnam(TEST_USER).pw_uid
    except KeyError:
        pytest.skip(f"no user {TEST_USER!r} on this machine (`make test` makes it as root: scripts/prereqs.sh)")
    if os.geteuid() != 0:
        pytest.skip("starting a container as another user needs a manager running as root")
    if os.system("/usr/bin/python3 -c 'import zmq, msgpack, numpy' 2>/dev/null") != 0:
        pytest.skip("the system's Python lacks pyzmq, msgpack or numpy (`make test` installs them: scripts/prereqs.sh)")
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="ib-users-"))  # outside the manager's owner-only state_dir
    work.chmod(0o711)
    m = fresh_manager(boards=("local",), board_settings={"local": {"work_dir": str(work)}}, **setup.manager_settings()).start()
    secret = str(setup.dir / "keys" / "manager.key_secret")
    state_secret = str(m.state_dir / "keys" / "client.key_secret")
    snoop = dict(script_path=str(SCRIPTS), inference_modules=InferenceModulesConfig(sub_inference_name="snoop", script="snoop.py"))
    with connected(m) as c:
        # Positive control: as the manager's user the same program reads both.
        c.load_inference(ContainerConfig(name=name, implementation_type="process", input="Main", output="Main", **snoop), "local")
        for path in (secret, state_secret):
            assert c.infer(name, b"x", {"read": path})[0]["read"].startswith("#   ****")
        c.unload_inference(name)
        # The system's Python (the venv's may live where that user cannot go), with this tree's SDK.
        root = Path(__file__).resolve().parent.parent
        c.load_inference(ContainerConfig(name=name, implementation_type="process", input="Main", output="Main",
                                         run_command="/usr/bin/python3 snoop.py",
                                         run_option=f"--user {TEST_USER} -e PYTHONPATH={root}", **snoop), "local")
        for path in (secret, state_secret):
            answer = c.infer(name, b"x", {"read": path})[0]
            assert answer["uid"] == uid and answer["read"].startswith("PermissionError"), answer
        c.unload_inference(name)
        # Where the user cannot enter the containers' folder (the default: in state_dir), 302 says so.
    m2 = fresh_manager(boards=("local",), **setup.manager_settings()).start()
    with connected(m2) as c:
        with pytest.raises(InfinibrainException) as err:
            c.load_inference(ContainerConfig(name=name, implementation_type="process", input="Main", output="Main",
                                             run_option=f"--user {TEST_USER}", **snoop), "local")
        assert err.value.code == 302 and "work_dir" in str(err.value) and "cannot enter" in str(err.value)
    import shutil

    shutil.rmtree(work, ignore_errors=True)


# ---- 5. bounded memory and time under any input --------------------------------------------------------------


def test_a_70_MB_param_is_refused_at_once_by_the_sdk(cluster, name):
    cluster.load_inference(echo_config(name), "local")
    started = time.monotonic()
    with pytest.raises(InvalidArgumentException) as err:
        cluster.infer(name, b"x", {"blob": "a" * 70_000_000})
    assert time.monotonic() - started < 5 and err.value.code == 100
    assert "param" in str(err.value) and "max_header_size" in str(err.value)
    assert cluster.infer(name, b"x", {"small": 1})[0]["param"] == {"small": 1}
    cluster.unload_inference(name)


def test_floods_leave_the_manager_serving_with_bounded_memory(setup, fresh_manager, name):
    m = fresh_manager(boards=("local",), **setup.manager_settings()).start()
    with connected(m) as c:
        c.load_inference(echo_config(name, max_send_num=4), "local")
        c.load_inference(echo_config(name + "big", max_send_num=4), "local")  # what the never-readers ask for
        for _ in range(50):
            c.infer(name, b"warm")
        baseline = rss(m.proc.pid)
        keys = client_keys(setup, "client2")
        spawn = mp.get_context("spawn")
        floods = [spawn.Process(target=flood, args=(m.port, keys, name, 60_000_000, 1)),  # a huge header
                  spawn.Process(target=flood, args=(m.port, keys, name, 5_000_000, 400))]  # many large headers
        floods += [spawn.Process(target=flood, args=(m.port, keys, name + "big", 0, 900)) for _ in range(3)]  # never read
        for f in floods:
            f.start()
        peak, slowest, served = baseline, 0.0, 0
        deadline = time.monotonic() + 60
        while any(f.is_alive() for f in floods) and time.monotonic() < deadline:
            started = time.monotonic()
            assert c.infer(name, b"during", {"i": served})[0]["param"] == {"i": served}  # never refused nor lost
            slowest = max(slowest, time.monotonic() - started)
            served += 1
            peak = max(peak, rss(m.proc.pid))
        for f in floods:
            f.join(30)
        stats = manager_stats(c)
        print(f"flood: served {served}, slowest {slowest * 1000:.0f} ms, peak +{(peak - baseline) / 1e6:.0f} MB, "
              f"dropped {stats['dropped_by_port']}, not sent {stats['dropped_sends']}")
        assert stats["dropped_by_port"].get("requests", 0) >= 400  # every oversized header dropped, counted
        assert stats["dropped_sends"].get("client does not read", 0) > 0  # the never-readers' results, counted
        assert served > 20 and slowest < 2.0, (served, slowest)  # before: every client lost for 9 s
        assert peak - baseline < 700_000_000, f"the manager grew by {(peak - baseline) / 1e6:.0f} MB"  # before: 1,800 MB
        wait_for(lambda: rss(m.proc.pid) < baseline + 100_000_000, timeout=30)  # back near its baseline
        c.unload_inference(name)
        c.unload_inference(name + "big")
