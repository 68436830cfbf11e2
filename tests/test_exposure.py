"""Secure by default: which listener faces which network, and who can do what through it.

127.0.0.1 stands in for the applications' side and 127.0.0.5 for the boards' network
(both loopback: nothing here leaves the machine). docs/RELIABILITY.md's threat model
names the test behind each of its lines.
"""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import uuid

import pytest
import zmq

from conftest import ManagerProcess, connect_raw, connected, echo_config, manager_stats, send_until, wait_for
from infinibrain import AICluster, SocketConnectionException, security
from infinibrain import protocol as P

BOARDS_NET = "127.0.0.5"


def refused(host: str, port: int) -> bool:
    """Whether nothing listens on host:port (a TCP connection is refused)."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def split_manager(fresh_manager):
    """A manager with applications on 127.0.0.1 and containers on the boards' address."""
    return fresh_manager(board_host=BOARDS_NET, boards=("local",)).start()


def test_applications_and_containers_have_listeners_apart(split_manager, name):
    m = split_manager
    with connected(m) as c:
        c.load_inference(echo_config(name), "local")
        result, _ = c.infer(name, b"abc")
        assert result["env"]["INFINIBRAIN_HOST"] == BOARDS_NET  # the container came in on the boards' side
        c.unload_inference(name)
    for offset in (P.INFER_IN, P.MGMT_IN, P.CLIENT_OUT):
        assert refused(BOARDS_NET, m.port + offset), f"application port +{offset} faces the boards"
    for offset in (P.CONTAINER_OUT, P.CONTAINER_IN):
        assert refused("127.0.0.1", m.port + offset), f"container port +{offset} is on the applications' side"
    with pytest.raises(SocketConnectionException):
        AICluster(host_ip=BOARDS_NET, port=m.port, timeout=2)


def test_the_board_ports_take_no_commands_and_no_requests(split_manager, name):
    m = split_manager
    ctx = zmq.Context()
    try:
        with connected(m) as c:
            c.load_inference(echo_config(name), "local")
            instance = c.infer(name, b"x")[0]["env"]["INFINIBRAIN_INSTANCE"]
            # What a program on a board (here: posing as the container itself) might try.
            results_port = ctx.socket(zmq.PUB)
            connect_raw(results_port, f"tcp://{BOARDS_NET}:{m.port + P.CONTAINER_IN}")
            requests_port = ctx.socket(zmq.XSUB)
            connect_raw(requests_port, f"tcp://{BOARDS_NET}:{m.port + P.CONTAINER_OUT}")
            # Connected: a probe (not a message) through each has reached the manager, which dropped it.
            for sock, port_name in ((results_port, "container-results"), (requests_port, "container-out")):
                probed = manager_stats(c)["dropped_by_port"].get(port_name, 0)
                send_until(lambda s=sock: s.send(b"probe"),
                           lambda p=port_name, n=probed: manager_stats(c)["dropped_by_port"].get(p, 0) > n)
            before = manager_stats(c)["dropped_by_port"]
            command = {"cid": "intruder", "pid": 1, "rid": "r1", "cmd": "unload_inference",
                       "args": {"inference_name": name, "coprocessor_name": ""}}
            request = {"cid": "intruder", "pid": 1, "tid": 1, "rid": "r2", "inf": name, "param": {}, "arr": None}
            for sock in (results_port, requests_port):
                for header in (dict(command, cont=instance), command, dict(request, cont=instance)):
                    kind = P.COMMAND if "cmd" in header else P.REQUEST
                    P.send(sock, P.encode(P.TOPIC_MANAGER, kind, header, [b"data"] if kind == P.REQUEST else []))
            after = wait_for(lambda: (lambda d: d if sum(d.values()) >= sum(before.values()) + 4 else None)(
                manager_stats(c)["dropped_by_port"]))
            assert after.get("container-results", 0) > before.get("container-results", 0)
            assert after.get("container-out", 0) > before.get("container-out", 0)
            # Nothing was done: the inference is there and serves; no request of the intruder ran.
            assert c.get_container_handler(name)[0].name == name
            assert c.infer(name, b"still")[0]["shape"] == [5]
            c.unload_inference(name)
    finally:
        ctx.destroy(linger=0)


def test_a_container_key_cannot_command(curve_manager, name, monkeypatch):
    m, setup = curve_manager
    with connected(m) as c:
        c.load_inference(echo_config(name), "local")
        env = c.infer(name, b"x")[0]["env"]
        refused_before = manager_stats(c)["refused_keys"]["clients"]
        # The key pair every container of this manager holds, used as an application would.
        monkeypatch.setenv(security.ENV_SERVER_KEY, env[security.ENV_SERVER_KEY])
        monkeypatch.setenv(security.ENV_PUBLIC_KEY, env[security.ENV_PUBLIC_KEY])
        monkeypatch.setenv(security.ENV_SECRET_KEY, env[security.ENV_SECRET_KEY])
        with pytest.raises(SocketConnectionException) as err:
            AICluster(port=m.port, timeout=5)
        assert "refused" in str(err.value)
        assert manager_stats(c)["refused_keys"]["clients"] > refused_before
        assert c.get_container_handler(name)[0].name == name
        c.unload_inference(name)


@pytest.fixture
def curve_manager(fresh_manager, tmp_path, monkeypatch):
    """A CURVE manager made the one-step way (``init``), and its client found without settings."""
    for key in (security.ENV_SERVER_KEY, security.ENV_CLIENT_KEY, security.ENV_PUBLIC_KEY, security.ENV_SECRET_KEY):
        monkeypatch.delenv(key, raising=False)
    m = fresh_manager(boards=("local",))
    init = run_manager("init", "--boards-network", BOARDS_NET, "--port", str(m.port), "--state-dir", str(m.state_dir),
                       "--config", str(m.config_path), "--force")
    assert init.returncode == 0, init.stderr
    return m.start(), init


def run_manager(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infinibrain.manager", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("settings, named", [
    ({"board_host": "10.0.0.1"}, "board_host"),
    ({"host": "0.0.0.0"}, "host"),
    ({"board_host": "10.0.0.1", "curve": False, "allow_unauthenticated": False}, "board_host"),
])
def test_a_listener_off_loopback_without_keys_is_refused(tmp_path, settings, named):
    m = ManagerProcess(tmp_path, boards=("local",), **settings)
    out = run_manager("--config", str(m.config_path))
    assert out.returncode == 2
    assert f"manager.{named}" in out.stderr and "CURVE" in out.stderr
    assert "allow_unauthenticated" in out.stderr and "infinibrain-manager init" in out.stderr


def test_the_explicit_opt_out_is_warned_at_every_start(caplog):
    from infinibrain.manager.config import parse_config
    from infinibrain.manager.daemon import warn_exposure

    cfg = parse_config({"manager": {"board_host": "10.0.0.1", "allow_unauthenticated": True, "metrics_host": "0.0.0.0"},
                        "coprocessor": [{"name": "local"}]})
    assert cfg.boards[0].manager_address == "10.0.0.1"
    with caplog.at_level(logging.WARNING, logger="infinibrain.manager"):
        warn_exposure(cfg)
    text = caplog.text
    assert "board_host = 10.0.0.1" in text and "without a key" in text
    assert "metrics on 0.0.0.0" in text


def test_an_ssh_board_off_loopback_needs_a_reachable_board_host():
    from infinibrain.manager.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="board_host"):
        parse_config({"coprocessor": [{"name": "j1", "transport": "ssh", "address": "10.0.0.11", "ssh_user": "u"}]})


def test_init_refuses_what_would_not_start_and_keeps_an_existing_file(tmp_path):
    cfg = tmp_path / "m.toml"
    out = run_manager("init", "--boards-network", "not-an-address", "--config", str(cfg), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "--boards-network" in out.stderr and not cfg.exists()
    cfg.write_text("# mine\n")
    out = run_manager("init", "--boards-network", BOARDS_NET, "--config", str(cfg), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "--force" in out.stderr and cfg.read_text() == "# mine\n"


def test_a_group_members_settings_are_checked_naming_the_key():
    from manager.config import ConfigError, parse_config

    def group(**kw):
        return parse_config({"manager": {"etcd": "http://127.0.0.1:2379", "group_hosts": "127.0.0.1,127.0.0.2", **kw},
                             "coprocessor": [{"name": "local"}]})

    assert group().board_host == "127.0.0.1"  # a member faces its containers on its own host
    with pytest.raises(ConfigError, match="group_hosts must list every manager"):
        group(host="127.0.0.3")
    with pytest.raises(ConfigError, match="not an etcd client URL"):
        group(etcd="127.0.0.1:2379")
    with pytest.raises(ConfigError, match="leader_lease_s"):
        group(leader_lease_s=1)
    with pytest.raises(ConfigError, match="etcd_user and manager.etcd_password_file"):
        group(etcd_user="root")


def test_init_writes_a_groups_configurations_that_the_manager_accepts(tmp_path):
    from manager.config import load_config

    cfg = tmp_path / "m.toml"
    out = run_manager("init", "--group", "10.0.0.1,10.0.0.2", "--config", str(cfg), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "--etcd" in out.stderr  # a group needs its etcd
    out = run_manager("init", "--group", "10.0.0.1,10.0.0.2", "--etcd", "http://10.0.0.1:2379,http://10.0.0.2:2379",
                      "--ssh-board", "j1=u@10.0.0.11", "--config", str(cfg), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 0, out.stderr
    configs = [load_config(tmp_path / f"m-10.0.0.{i}.toml") for i in (1, 2)]
    assert [c.host for c in configs] == ["10.0.0.1", "10.0.0.2"] and [c.board_host for c in configs] == ["10.0.0.1", "10.0.0.2"]
    for c in configs:
        assert c.curve and c.etcd == "http://10.0.0.1:2379,http://10.0.0.2:2379" and c.group_hosts == "10.0.0.1,10.0.0.2"
        assert [b.name for b in c.boards] == ["j1"]  # no "local": it would be another board on each machine
        assert c.boards[0].manager_address == "10.0.0.1,10.0.0.2"  # its containers are told the whole group
    assert configs[0].curve_secret_key == configs[1].curve_secret_key  # one server key for the group
    assert not cfg.exists()


def test_init_makes_a_manager_that_local_applications_and_ssh_board_containers_reach(ssh_boards, tmp_path, monkeypatch):
    for key in (security.ENV_SERVER_KEY, security.ENV_CLIENT_KEY, security.ENV_PUBLIC_KEY, security.ENV_SECRET_KEY):
        monkeypatch.delenv(key, raising=False)
    m = ManagerProcess(tmp_path / "m", boards=())  # its port and folders; init writes the configuration
    board = ssh_boards.settings("b1")
    out = run_manager("init", "--boards-network", BOARDS_NET, "--port", str(m.port), "--state-dir", str(m.state_dir),
                      "--config", str(m.config_path), "--force",
                      "--ssh-board", f"b1={board['ssh_user']}@{board['address']}:{board['ssh_port']}",
                      "--ssh-key", board["ssh_key"], "--known-hosts", board["known_hosts"])
    assert out.returncode == 0, out.stderr
    text = m.config_path.read_text()
    assert "curve = true" in text and f'board_host = "{BOARDS_NET}"' in text and 'host = "127.0.0.1"' in text
    # The emulated board's own settings (its interpreter and a folder under the test's).
    with open(m.config_path, "a") as fh:  # b1 is the file's last table
        fh.write(f'python = "{board["python"]}"\nwork_dir = "{board["work_dir"]}"\nimage_transfer = "sftp"\n')
    m.start()
    try:
        assert security.access_file(m.port).exists()
        with connected(m) as c:  # no key settings: the access file of this user's manager
            name = "t" + uuid.uuid4().hex[:8]
            c.load_inference(echo_config(name), ["local", "b1"])
            results = [c.infer(name, b"x")[0] for _ in range(20)]
            assert {r["board"] for r in results} == {"local", "b1"}  # both containers answer
            assert {r["env"]["INFINIBRAIN_HOST"] for r in results} == {BOARDS_NET}
            assert all(r["env"][security.ENV_SECRET_KEY] for r in results)  # each came in with its keys
            c.unload_inference(name)
        # Without keys nothing passes: a plain client of the same manager is refused.
        security.access_file(m.port).rename(tmp_path / "moved.json")
        with pytest.raises(SocketConnectionException):
            AICluster(port=m.port, timeout=3)
    finally:
        m.stop()
        m.cleanup()
