"""SSH boards against real OpenSSH servers: two emulated boards (scripts/boards.py), each an
sshd on its own loopback address sharing this machine's Docker engine."""
from __future__ import annotations

import subprocess
import threading
import time

import numpy as np
import pytest

from infinibrain.errors import InfinibrainException

from conftest import connected, echo_config, wait_for
from test_docker import classifier, colour, refused, served_by


def fingerprint(key_file) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(key_file)], capture_output=True, text=True, check=True).stdout
    return out.split()[1]  # "256 SHA256:... comment (ED25519)"


def answers(cluster, name: str, n: int) -> dict[str, int]:
    """Send ``n`` requests one after another; count the answering boards (all must succeed)."""
    seen: dict[str, int] = {}
    for _ in range(n):
        board = cluster.infer_image(name, np.zeros((8, 8, 3), np.uint8))["board"]
        seen[board] = seen.get(board, 0) + 1
    return seen


@pytest.fixture
def sm(ssh_boards, tmp_path):
    """A manager with the two SSH boards."""
    m = ssh_boards.manager(tmp_path / "m").start()
    yield m
    m.stop()
    m.cleanup()


def test_reference_flow_on_two_ssh_boards(docker_kit, ssh_boards, sm, name):
    kit = docker_kit
    if kit.has_image(kit.tag):
        kit.client.images.remove(kit.tag)
    with connected(sm) as cluster:
        # load to "all": the tar goes to the board over SFTP, docker load runs there
        handlers = cluster.load_inference(classifier(kit, name), "all")
        assert sorted(h.suffix_name for h in handlers) == [f"{name}-b1", f"{name}-b2"]
        sent = [h.deployment for h in handlers if h.deployment.get("image_bytes")]
        # the emulated boards share one engine: the first load brings the image for both
        assert len(sent) == 1 and sent[0]["image_bytes"] == kit.tar.stat().st_size and sent[0]["transfer_seconds"] > 0
        log = sm.log()
        assert "sending classifier.tar" in log and "sent classifier.tar" in log
        made = [c for c in kit.containers(sm) if c.labels["infinibrain.inference"] == name]
        assert sorted(c.labels["infinibrain.board"] for c in made) == ["b1", "b2"]

        for channel, label in ((0, "red"), (1, "green"), (2, "blue")):
            assert cluster.infer_image(name, colour(channel))["label"] == label

        b1, b2 = cluster.get_coprocessor_handler(name)
        assert (b1.name, b1.ip, b2.name, b2.ip) == ("b1", "127.0.0.2", "b2", "127.0.0.3")
        b1.stop_distribution(name)
        assert served_by(cluster, name) == {"b2"}
        b1.start_distribution(name)
        assert served_by(cluster, name, 12) == {"b1", "b2"}

        rows = {s.suffix_name: s for s in cluster.get_container_status(name)}
        for s in rows.values():
            assert s.status == "running" and s.connect_status == "connected"
            assert s.cpu_proc.endswith("%") and "/" in s.mem_usage and s.created.startswith("20")
        for images in cluster.get_coprocessor_images(name):
            assert any(kit.tag in i["tags"] for i in images.images), images

        note = sm.tmp / "note.txt"
        note.write_text("put over ssh\n")
        cluster.put_file(name, {"file": str(note), "To": "/data/in/"})
        for c in made:
            assert c.exec_run(["cat", "/data/in/note.txt"]).output == b"put over ssh\n"

        h1 = next(h for h in handlers if h.allocated_coprocessor == "b1")
        assert h1.stop().status.startswith("exited")
        assert served_by(cluster, name) == {"b2"}
        assert h1.start().status == "running"
        wait_for(lambda: {s.connect_status for s in cluster.get_container_status(name)} == {"connected"}, 20)

        # process containers run on the boards too, from files sent over SFTP
        echo = name + "p"
        cluster.load_inference(echo_config(echo), "all")
        result = cluster.infer_image(echo, np.zeros((4, 4, 3), np.uint8))
        work = ssh_boards.dir / result["board"] / "work" / "containers" / f"{echo}-{result['board']}.r1"  # one folder per instance
        assert result["cwd"] == str(work) and "echo.py" in result["cwd_files"]
        assert result["env"]["INFINIBRAIN_BOARD"] == result["board"]
        cluster.put_file(echo, {"file": str(note), "To": "in/"})
        assert cluster.infer_image(echo, np.zeros((4, 4, 3), np.uint8), param={"read": "in/note.txt"})["read"] == "put over ssh\n"
        listed = [i for i in b2.get_images()[0].images if i.get("inference_name") == echo]
        assert listed and listed[0]["size"] > 1000
        assert "--- start" in cluster.get_container_logs(f"{echo}-b1", "b1", 20)  # read from the board's log file

    # a manager restart brings the same containers back; reload_inference remakes them
    sm.stop()
    sm.start()
    with connected(sm) as cluster:
        wait_for(lambda: len(cluster.get_container_status(name)) == 2
                 and {s.connect_status for s in cluster.get_container_status(name)} == {"connected"}, 30)
        assert answers(cluster, echo, 4)
        before = {c.id for c in kit.containers(sm) if c.labels["infinibrain.inference"] == name}
        cluster.reload_inference(name)
        after = {c.id for c in kit.containers(sm) if c.labels["infinibrain.inference"] == name}
        assert len(after) == 2 and not before & after
        assert cluster.infer_image(name, colour(2))["label"] == "blue"

        cluster.unload_inference(echo)
        assert not work.exists()
        cluster.unload_inference(name)
        assert not [c for c in kit.containers(sm) if c.labels["infinibrain.inference"] == name]
        assert not kit.has_image(kit.tag)


def test_board_down_during_inference_and_back(ssh_boards, sm, name):
    with connected(sm) as cluster:
        cluster.load_inference(echo_config(name), "all")
        assert set(answers(cluster, name, 6)) == {"b1", "b2"}
        errors: list[str] = []
        done = threading.Event()
        counts: dict[str, int] = {}

        def load() -> None:  # requests keep going while the board's sshd dies
            deadline = time.monotonic() + 60
            while not done.is_set() and time.monotonic() < deadline and sum(counts.values()) < 5000:
                try:
                    board = cluster.infer_image(name, np.zeros((8, 8, 3), np.uint8))["board"]
                    counts[board] = counts.get(board, 0) + 1
                except InfinibrainException as exc:
                    errors.append(str(exc))

        worker = threading.Thread(target=load)
        worker.start()
        try:
            ssh_boards.stop("b1")
            began = time.monotonic()
            message = refused(lambda: cluster.get_container_status(name), 500)
            assert "board 'b1'" in message and "127.0.0.2" in message, message
            assert time.monotonic() - began < 3 + 20  # the connect timeout, not a hang
            refused(lambda: cluster.get_coprocessor_handler()[0].get_images(), 500)
            # the other board's commands go on
            b2 = cluster.get_coprocessor_handler()[1]
            assert b2.name == "b2" and b2.get_images()[0].name == "b2"
            other = name + "x"
            cluster.load_inference(echo_config(other), "b2")
            assert answers(cluster, other, 2) == {"b2": 2}
            seen_during = dict(counts)
        finally:
            ssh_boards.start("b1")
        wait_for(lambda: sum(counts.values()) > sum(seen_during.values()) + 20, 20)
        done.set()
        worker.join(30)
        assert not errors, errors[:3]
        assert counts.get("b1", 0) > seen_during.get("b1", 0)  # b1's container served throughout

        # back: used again without restarting the manager
        assert {s.suffix_name for s in wait_for(lambda: _status_or_none(cluster, name), 20)} == {f"{name}-b1", f"{name}-b2"}
        h1 = next(h for h in cluster.get_container_handler(name) if h.allocated_coprocessor == "b1")
        assert h1.stop().status.startswith(("stopped", "exited"))
        assert h1.start().status == "running"
        wait_for(lambda: set(answers(cluster, name, 6)) == {"b1", "b2"}, 20)
        assert "is reachable again" in sm.log()


def _status_or_none(cluster, name):
    try:
        return cluster.get_container_status(name)
    except InfinibrainException:
        return None


def test_transfer_cut_off_loads_nothing_and_a_retry_works(docker_kit, ssh_boards, sm, name):
    kit = docker_kit
    if kit.has_image(kit.tag):
        kit.client.images.remove(kit.tag)
    with connected(sm) as cluster:
        outcome: list = []
        got = threading.Event()
        cluster.load_inference_async(classifier(kit, name), "b1", func=lambda code, msg, cmd, result: (outcome.append((code, msg)), got.set()))
        wait_for(lambda: "sending classifier.tar" in sm.log(), 30, 0.01)
        ssh_boards.stop("b1")
        try:
            assert got.wait(60)
            code, message = outcome[0]
            assert code == 500 and message == "SSH error", outcome
            assert not kit.has_image(kit.tag)
            assert not [c for c in kit.containers(sm) if c.labels["infinibrain.inference"] == name]
        finally:
            ssh_boards.start("b1")
        handler = cluster.load_inference(classifier(kit, name), "b1")  # one board: one ContainerHandler
        assert handler.deployment["image_bytes"] == kit.tar.stat().st_size
        assert cluster.infer_image(name, colour(0))["label"] == "red"
        cluster.unload_inference(name)
        assert not list((ssh_boards.dir / "b1" / "work" / "images").glob("*"))  # no tar or .part left


def test_unknown_and_changed_host_keys_are_refused(ssh_boards, tmp_path, name):
    real = fingerprint(ssh_boards.dir / "b1" / "ssh_host_ed25519_key.pub")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.2]:2222 {ssh_boards.host_key('b2')}\n")  # another board's key
    accepting = tmp_path / "accepting_known_hosts"
    overrides = {"b1": {"known_hosts": str(empty)}, "b2": {"known_hosts": str(wrong), "address": "127.0.0.2"}}
    m = ssh_boards.manager(tmp_path / "m", overrides=overrides).start()
    try:
        with connected(m) as cluster:
            message = refused(lambda: cluster.load_inference(echo_config(name), "b1"), 500)
            assert "board 'b1'" in message and real in message and "not in" in message, message
            message = refused(lambda: cluster.load_inference(echo_config(name), "b2"), 500)
            assert "board 'b2'" in message and "CHANGED" in message and real in message, message
            assert not cluster.get_container_handler()
    finally:
        m.stop()
        m.cleanup()
    # opting in records the key, and the board is used
    m = ssh_boards.manager(tmp_path / "m2", boards=("b1",), overrides={"b1": {"known_hosts": str(accepting), "accept_new_host_keys": True}}).start()
    try:
        with connected(m) as cluster:
            cluster.load_inference(echo_config(name), "b1")
            assert answers(cluster, name, 2) == {"b1": 2}
        assert ssh_boards.host_key("b1") in accepting.read_text()
    finally:
        m.stop()
        m.cleanup()


def test_wrong_user_key_is_refused(ssh_boards, tmp_path, name):
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    m = ssh_boards.manager(tmp_path / "m", overrides={"b1": {"ssh_key": str(key)}}).start()
    try:
        with connected(m) as cluster:
            message = refused(lambda: cluster.load_inference(echo_config(name), "b1"), 500)
            assert "board 'b1'" in message and "refused" in message and str(key) in message, message
            cluster.load_inference(echo_config(name), "b2")  # the other board is fine
            assert answers(cluster, name, 2) == {"b2": 2}
    finally:
        m.stop()
        m.cleanup()


@pytest.mark.parametrize("content, why", [(None, "does not exist"), ("not a key\n", "not a usable private key")])
def test_bad_user_key_stops_the_manager_at_start(ssh_boards, tmp_path, content, why):
    key = tmp_path / "key"
    if content is not None:
        key.write_text(content)
    m = ssh_boards.manager(tmp_path / "m", overrides={"b2": {"ssh_key": str(key)}})
    with pytest.raises(RuntimeError):
        m.start()
    assert m.proc.wait(10) == 2
    log = m.log()
    assert "coprocessor 'b2'" in log and str(key) in log and why in log, log


def test_ssh_board_settings_are_checked(tmp_path):
    from infinibrain.manager.config import ConfigError, parse_config

    board = {"name": "j1", "transport": "ssh", "address": "127.0.0.2", "ssh_user": "u"}
    cfg = parse_config({"coprocessor": [board]})
    assert cfg.boards[0].known_hosts.endswith("/.ssh/known_hosts") and cfg.boards[0].accept_new_host_keys is False
    for bad, says in (({"docker_host": "unix:///x"}, "docker_host"), ({"accept_new_host_keys": "yes"}, "true or false"),
                      ({"ssh_connect_timeout_ms": 0}, "ssh_connect_timeout_ms"), ({"ssh_user": ""}, "ssh_user")):
        with pytest.raises(ConfigError, match=says):
            parse_config({"coprocessor": [{**board, **bad}]})


def test_unreachable_board_fails_fast_and_names_the_cause(ssh_boards, tmp_path, name):
    # nothing listens on 127.0.0.9:2222: refused at once, named, and the other board serves
    m = ssh_boards.manager(tmp_path / "m", overrides={"b1": {"address": "127.0.0.9"}}).start()
    try:
        with connected(m) as cluster:
            message = refused(lambda: cluster.load_inference(echo_config(name), "all"), 500)
            assert "board 'b1'" in message and "127.0.0.9" in message and "refused" in message.lower(), message
            assert not cluster.get_container_handler()  # the load on "all" left nothing behind
            cluster.load_inference(echo_config(name), "b2")
            assert answers(cluster, name, 2) == {"b2": 2}
    finally:
        m.stop()
        m.cleanup()
