"""A manager group on etcd (issue 28): real etcd members from Debian's etcd-server on
loopback, managers on 127.0.0.1 and 127.0.0.2 (one base port), an application and a
container that follow the leader. Faults are real: SIGKILL, SIGSTOP, etcd members killed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

import pytest

from conftest import echo_config, wait_for
from group_kit import ETCD, EtcdCluster, Group
from infinibrain import AICluster
from infinibrain.errors import InfinibrainException

pytest.importorskip("etcd3gw", reason="etcd's client is the group extra (part of the test extra)")
pytestmark = pytest.mark.skipif(ETCD is None, reason="etcd is not installed (Debian's etcd-server; make test installs it)")


@pytest.fixture
def etcd(tmp_path):
    cluster = EtcdCluster(tmp_path / "etcd").start()
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd3(tmp_path):
    cluster = EtcdCluster(tmp_path / "etcd3", size=3).start()
    yield cluster
    cluster.stop()


@contextmanager
def running_group(tmp_path, etcd: EtcdCluster, **kw) -> Iterator[Group]:
    """Two managers of a group on ``etcd``, the first leading; stopped after, their containers ended."""
    g = Group(tmp_path / "group", etcd, 2, **kw)
    try:
        yield g.start()
    finally:
        g.stop()


@contextmanager
def serving(tmp_path, etcd: EtcdCluster, name: str) -> Iterator[tuple[Group, AICluster]]:
    """A group (``running_group``) and an application of it, serving an echo inference ``name``."""
    with running_group(tmp_path, etcd) as g, AICluster(g.host_ip, g.port) as c:
        c.load_inference(echo_config(name), "local")
        yield g, c


def pid_of(c: AICluster, name: str) -> int:
    return c.infer(name, b"x")[0]["pid"]


def registry_in(etcd: EtcdCluster, name: str) -> dict:
    """The inference's registration as etcd holds it (etcdctl, another client than ours)."""
    out = subprocess.run(["etcdctl", f"--endpoints={etcd.urls}", "get", f"/infinibrain/inferences/{name}",
                          "--print-value-only"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "ETCDCTL_API": "3"}).stdout
    return json.loads(out) if out.strip() else {}


def test_the_standby_serves_the_same_containers_after_the_leader_is_killed(tmp_path, etcd, name):
    with serving(tmp_path, etcd, name) as (g, c):
        first, standby = g.members
        pid = pid_of(c, name)
        group = wait_for(lambda: len(c.get_board_telemetry()["group"].get("members", [])) == 2
                         and c.get_board_telemetry()["group"])
        assert group["role"] == "leader" and group["leader"]["host"] == first.host
        assert {m["host"] for m in group["members"]} == set(g.hosts)  # the standby is listed
        events: list[int] = []
        c.set_callback(manage_callback=lambda code, *rest: events.append(code))
        first.kill()
        killed = time.monotonic()
        # The application follows by itself (no code change), and so does the container:
        # the same process answers through the new leader.
        answer = wait_for(lambda: _try(lambda: c.infer(name, b"after")), timeout=20)
        took = time.monotonic() - killed
        assert answer[0]["pid"] == pid and answer[0]["sum"] == sum(b"after")
        assert took < 4 * 3, f"requests flowed again only after {took:.1f} s"
        assert g.leader() is standby
        assert wait_for(lambda: 112 in events and 113 in events, timeout=5)  # the keepalive codes told the application
        group = c.get_board_telemetry()["group"]
        assert group["leader"]["host"] == standby.host and group["transitions"] == 2
        assert len(registry_in(etcd, name)["boards"]["local"]["instances"]) == 1  # not deployed twice
        assert "adopted" in standby.log()
        c.unload_inference(name)
        assert registry_in(etcd, name) == {}


def _try(fn):
    try:
        return fn()
    except InfinibrainException:
        time.sleep(0.05)
        return None


def test_a_standby_never_routes_while_the_leader_lives(tmp_path, etcd, name):
    with running_group(tmp_path, etcd) as g:
        leader, standby = g.members
        with pytest.raises(InfinibrainException) as err:  # the standby binds nothing: no answer there
            AICluster(standby.host, g.port, timeout=1.0)
        assert err.value.code == 110
        with AICluster(g.host_ip, g.port) as c:
            c.load_inference(echo_config(name), "local")
            for _ in range(20):
                c.infer(name, b"x")
            c.unload_inference(name)
        assert "serving applications" not in standby.log() and "leads" not in standby.log()
        assert g.leader() is leader


def test_a_paused_leader_that_lost_its_lease_changes_nothing_and_steps_down(tmp_path, etcd, name):
    with serving(tmp_path, etcd, name) as (g, c):
        old, new = g.members
        pid = pid_of(c, name)
        old.pause()  # SIGSTOP: its sockets stay bound, its lease runs out
        wait_for(new.leads, timeout=20)
        wait_for(lambda: _try(lambda: c.infer(name, b"x")), timeout=20)
        c.load_inference(echo_config(name + "b"), "local")  # a change through the new leader
        old.resume()
        wait_for(lambda: "no longer leads" in old.log() and "standing by" in old.log().rsplit("leading the group", 1)[-1],
                 timeout=20)
        for _ in range(20):  # the resumed manager serves nothing: every answer comes through the new one
            assert pid_of(c, name) == pid
        assert g.leader() is new
        assert set(registry_in(etcd, name + "b")["boards"]) == {"local"}  # what the new leader wrote stands
        c.unload_inference("")


def test_a_deposed_leaders_writes_are_fenced(tmp_path, etcd):
    """The fence itself, with two Group objects in this process on the real etcd: the first
    leads, loses its lease (revoked, as expiry would), the second leads; the first's write
    is refused and it stops leading at once."""
    from manager.config import parse_config
    from manager.group import Group as Members

    config = parse_config({"manager": {"etcd": etcd.urls, "group_hosts": "127.0.0.1,127.0.0.2", "etcd_prefix": "/fence"},
                           "coprocessor": [{"name": "local"}]})
    stop = threading.Event()
    a, b = Members(config), Members(config)
    assert a.campaign(stop) and a.leading()
    writer = a.writer()
    writer.put("inferences/x", '{"v": 1}')
    a.etcd.revoke(a.lease)
    assert b.campaign(stop) and b.leading()
    with pytest.raises(InfinibrainException) as err:
        writer.put("inferences/x", '{"v": "stale"}')
    assert err.value.code == 309 and "no longer leads" in err.value.detail
    assert not a.leading()
    assert json.loads(b.writer().load("inferences/x")[0]["value"]) == {"v": 1}
    b_writer, term = b.writer(), b.term
    b.stop()  # its lead given up: nobody leads now, and still its writer writes nothing
    with pytest.raises(InfinibrainException) as err:
        b_writer.put("inferences/x", '{"v": "after"}')
    assert err.value.code == 309
    assert b.campaign(stop) and b.term != term  # a new term: the old writer's fence no longer matches
    b.term = 0  # an election whose answer was lost: the key is on b's lease, b does not know it leads
    assert b.campaign(stop) and b.term != 0 and b.leading()  # it takes its own lead up again, not waiting forever
    assert json.loads(b.writer().load("inferences/x")[0]["value"]) == {"v": 1}
    b.stop()


def test_one_etcd_member_killed_changes_nothing(tmp_path, etcd3, name):
    with serving(tmp_path, etcd3, name) as (g, c):
        leader = g.leader()
        etcd3.kill(etcd3.names[0])  # the member the managers talk to first
        deadline = time.monotonic() + 3 * 3  # three lease lengths of requests and a change
        while time.monotonic() < deadline:
            c.infer(name, b"x")
        c.load_inference(echo_config(name + "b"), "local")
        assert g.leader() is leader and "lost the lead" not in leader.log()
        c.unload_inference("")


def test_without_etcd_quorum_requests_are_served_and_changes_refused_until_it_returns(tmp_path, etcd3, name):
    with serving(tmp_path, etcd3, name) as (g, c):
        leader = g.leader()
        for n in etcd3.names[1:]:
            etcd3.kill(n)
        wait_for(lambda: c.get_board_telemetry()["group"]["changes"] != "accepted", timeout=30)
        assert c.infer(name, b"still")[0]["sum"] == sum(b"still")  # requests: served
        time.sleep(2 * 3)  # past its lease: it still leads, nobody could be elected
        assert c.infer(name, b"still")[0]["sum"] == sum(b"still")
        with pytest.raises(InfinibrainException) as err:
            c.load_inference(echo_config(name + "b"), "local")
        assert err.value.code == 309 and "cannot take changes" in err.value.detail
        etcd3.start(*etcd3.names[1:])
        wait_for(lambda: c.get_board_telemetry()["group"]["changes"] == "accepted", timeout=30)
        c.load_inference(echo_config(name + "b"), "local")  # accepted again
        assert c.infer(name + "b", b"y")[0]["sum"] == sum(b"y")
        assert g.leader() is leader
        c.unload_inference("")


def test_status_the_page_and_metrics_show_the_group(tmp_path, etcd):
    with running_group(tmp_path, etcd, metrics_port=0) as g:
        env = {**os.environ, "INFINIBRAIN_MANAGER": f"{g.host_ip}:{g.port}"}
        with AICluster(g.host_ip, g.port) as c:  # the standby is listed once the leader has read the members again
            wait_for(lambda: len(c.get_board_telemetry()["group"].get("members", [])) == 2, timeout=10)
        out = subprocess.run([sys.executable, "-m", "infinibrain.cli", "status"], capture_output=True, text=True,
                             timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        assert "GROUP" in out.stdout and "leader" in out.stdout and g.hosts[1] in out.stdout
        data = json.loads(subprocess.run([sys.executable, "-m", "infinibrain.cli", "status", "--json"], capture_output=True,
                                         text=True, timeout=60, env=env).stdout)
        assert data["group"]["role"] == "leader" and len(data["group"]["members"]) == 2
        page = urllib.request.urlopen(f"http://{g.hosts[0]}:{g.port + 5}/", timeout=10).read().decode()
        assert "<h2>Group</h2>" in page and g.hosts[1] in page and "standby" in page
        metrics = urllib.request.urlopen(f"http://{g.hosts[0]}:{g.port + 5}/metrics", timeout=10).read().decode()
        assert "infinibrain_group_leader 1.0" in metrics and "infinibrain_group_members 2.0" in metrics
        assert "infinibrain_group_quorum 1.0" in metrics and "infinibrain_group_leader_transitions_total 1.0" in metrics


def test_what_etcd_did_not_take_without_quorum_is_written_when_it_returns(tmp_path, etcd3, name):
    """A container healed while etcd had no quorum (its new pid unrecorded) is recorded once
    etcd is back, so a later leader adopts it instead of starting another."""
    with running_group(tmp_path, etcd3) as g, AICluster(g.host_ip, g.port) as c:
        c.load_inference(echo_config(name, run_option="--restart on-failure"), "local")
        pid = pid_of(c, name)
        for n in etcd3.names[1:]:
            etcd3.kill(n)
        wait_for(lambda: c.get_board_telemetry()["group"]["changes"] != "accepted", timeout=30)
        os.kill(pid, 9)  # healed by a restart the registry cannot record now
        healed = wait_for(lambda: (p := _try(lambda: pid_of(c, name))) and p != pid and p, timeout=30)
        assert registry_in_member(etcd3, name)["boards"]["local"]["instances"][0]["pid"] == pid  # not written yet
        etcd3.start(*etcd3.names[1:])
        wait_for(lambda: registry_in(etcd3, name).get("boards", {}).get("local", {}).get("instances", [{}])[0].get("pid")
                 == healed, timeout=30)
        c.unload_inference(name)


def registry_in_member(etcd: EtcdCluster, name: str) -> dict:
    """What the one etcd member still up holds (serializable: it has no quorum)."""
    out = subprocess.run(["etcdctl", f"--endpoints={etcd.urls.split(',')[0]}", "get", f"/infinibrain/inferences/{name}",
                          "--print-value-only", "--consistency=s"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "ETCDCTL_API": "3"}).stdout
    return json.loads(out)


def test_the_new_leader_adopts_a_docker_container(tmp_path, etcd, docker_kit, name):
    from infinibrain import ContainerConfig, InferenceModulesConfig

    from conftest import SCRIPTS

    config = ContainerConfig(name=name, implementation_type="docker", input="Main", output="Main",
                             image_tag="infinibrain/runtime:latest", script_path=str(SCRIPTS), run_command="python3 echo.py",
                             inference_modules=InferenceModulesConfig(sub_inference_name="echo", script="echo.py"))
    with running_group(tmp_path, etcd) as g, AICluster(g.host_ip, g.port) as c:
        c.load_inference(config, "local")
        assert c.infer(name, b"d")[0]["sum"] == sum(b"d")
        before = [x.id for x in docker_kit.containers(g.members[0])]
        g.members[0].kill()
        answer = wait_for(lambda: _try(lambda: c.infer(name, b"after")), timeout=30)
        assert answer[0]["sum"] == sum(b"after")
        assert [x.id for x in docker_kit.containers(g.members[1])] == before  # the same container, not another
        c.unload_inference(name)
