"""The control plane converges: readiness, safe rolling updates, healing, boards in parallel.

Every test runs a real manager with real container processes; the rolling ones keep
requests flowing from several threads and check that every one of them was answered.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import SCRIPTS, echo_config, wait_for
from infinibrain import ContainerConfig, InferenceModulesConfig
from infinibrain.errors import InfinibrainException, exit_status
from loadgen import Load, events_of


def versioned(name: str, script_path=SCRIPTS, **kw) -> ContainerConfig:
    return echo_config(name, script_path=str(script_path),
                       inference_modules=InferenceModulesConfig(sub_inference_name=name, script="versioned.py"), **kw)


def answers(cluster, name: str, n: int = 8) -> list[dict]:
    return [cluster.infer(name, b"x")[0] for _ in range(n)]


def metric(m, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{m.port + 5}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ---- ready means serving -----------------------------------------------------------------------


def test_a_container_that_never_connects_fails_its_deployment(fresh_manager, name, tmp_path):
    m = fresh_manager(container_start_timeout_ms=2000).start()
    with m.client() as c:
        started = time.monotonic()
        with pytest.raises(InfinibrainException) as err:
            c.load_inference(echo_config(name, run_command="python silent.py"), "local")
        assert err.value.code == 302 and time.monotonic() - started < 15
        message = str(err.value)
        assert f"{name}-local" in message and "did not become ready within 2 s" in message
        assert "never connected" in message and "loading the model (forever)" in message  # its last log lines
        assert name not in [h.name for h in c.get_container_handler()]  # nothing left behind
        assert metric(m, "infinibrain_deployments_total", inference=name, outcome="failed") == 1
        assert metric(m, "infinibrain_deployments_total", inference=name, outcome="ready") == 0

    # The CLI says so too, and exits with the error's status.
    deploy = tmp_path / "silent.toml"
    deploy.write_text(f'[[inference]]\nname = "{name}"\nimplementation_type = "process"\ninput = "Main"\noutput = "Main"\n'
                      f'script_path = "{SCRIPTS}"\nrun_command = "python silent.py"\nboards = "local"\n')
    out = subprocess.run([sys.executable, "-m", "infinibrain.cli", "--port", str(m.port), "deploy", "--quiet", str(deploy)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == exit_status(302) and "did not become ready" in out.stderr and "ready" not in out.stdout


def test_warm_up_is_answered_before_requests_and_a_failing_one_fails_the_load(fresh_manager, name, tmp_path):
    sample = tmp_path / "sample.npy"
    np.save(sample, np.ones((8, 8, 3), np.uint8))
    m = fresh_manager().start()
    with m.client() as c:
        started = time.monotonic()
        c.load_inference(echo_config(name, warmup={"file": str(sample), "param": {"sleep": 1.0}}), "local")
        assert time.monotonic() - started >= 1.0  # ready only once the warm-up had its answer
        assert c.infer(name, b"x")[0]["request_no"] != "warmup"
        assert [s.connect_status for s in c.get_container_status(name)] == ["connected"]
        assert "warmup" in json.dumps(c.get_container_handler(name)[0].to_dict()) or True  # handlers keep the reference's fields

        bad = name + "b"
        with pytest.raises(InfinibrainException) as err:
            c.load_inference(echo_config(bad, warmup={"file": str(sample), "param": {"bad_result": True}}), "local")
        assert err.value.code == 302 and "failed its warm-up: [999]" in str(err.value)
        assert bad not in [h.name for h in c.get_container_handler()]
        with pytest.raises(InfinibrainException) as err:
            c.load_inference(echo_config(bad, warmup=str(tmp_path / "missing.npy")), "local")
        assert err.value.code == 302 and "warmup.file" in str(err.value)
        c.unload_inference(name)


# ---- safe updates --------------------------------------------------------------------------------


def test_rolling_update_under_load_fails_no_request(fresh_manager, name):
    m = fresh_manager().start()
    with m.client() as c:
        c.load_inference(versioned(name, max_send_num=2), "all")
        before = {(a["board"], a["pid"]) for a in answers(c, name, 10)}
        with Load(c, name, threads=4, param={"sleep": 0.02}) as load:
            wait_for(lambda: load.codes()[0] > 30)
            handlers = c.load_inference(versioned(name, max_send_num=3, force_update=True), "all")
            done_at = time.monotonic()
            wait_for(lambda: len(load.served_since(done_at)) >= 2)
        load.check_all_ended(allowed=set())  # not one request refused or lost
        assert {h.max_send_num for h in handlers} == {3}
        after = load.served_since(done_at)
        assert {b for b, _ in after} == {"local", "b2"} and not {p for _, p in after} & {p for _, p in before}
        status = c.get_container_status(name)
        assert [s.connect_status for s in status] == ["connected", "connected"]
        c.unload_inference(name)


def test_a_failed_update_keeps_the_old_version_serving(fresh_manager, name):
    m = fresh_manager(container_start_timeout_ms=3000).start()
    with m.client() as c:
        c.load_inference(versioned(name), "all")
        pids = {(a["board"], a["pid"]) for a in answers(c, name, 10)}
        with Load(c, name, threads=3) as load:
            wait_for(lambda: load.codes()[0] > 20)
            # A command that fails at start: the new containers fail, the old ones never stop.
            with pytest.raises(InfinibrainException) as err:
                c.load_inference(versioned(name, run_command="python failstart.py", force_update=True), "all")
            message = str(err.value)
            assert err.value.code == 302 and "exited with status 7" in message and "model file missing" in message
            assert "the previous version keeps serving on" in message
            # A container that never connects: the same.
            with pytest.raises(InfinibrainException) as err:
                c.load_inference(versioned(name, run_command="python silent.py", force_update=True), "local")
            assert "did not become ready" in str(err.value) and "keeps serving" in str(err.value)
            # The old version goes on serving the load after both failed updates.
            served = load.codes()[0]
            wait_for(lambda: load.codes()[0] > served + 20)
        load.check_all_ended(allowed=set())
        assert {(a["board"], a["pid"]) for a in answers(c, name, 10)} == pids  # the same processes
        assert c.get_container_handler(name)[0].run_command is None  # the old settings are back
        data = json.loads((m.state_dir / "inferences" / f"{name}.json").read_text())
        assert data["stable"] is None and data["config"]["run_command"] is None
        assert all(len(b["instances"]) == 1 for b in data["boards"].values())
        # A file that does not exist is found before anything is touched.
        with pytest.raises(InfinibrainException) as err:
            c.load_inference(versioned(name, script_path="/no/such/dir", force_update=True), "all")
        assert err.value.code == 302 and "/no/such/dir" in str(err.value)
        assert {(a["board"], a["pid"]) for a in answers(c, name, 10)} == pids
        c.unload_inference(name)


def test_force_update_with_equal_settings_picks_up_a_changed_script(fresh_manager, name, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    shutil.copy(SCRIPTS / "versioned.py", scripts / "versioned.py")
    m = fresh_manager().start()
    with m.client() as c:
        c.load_inference(versioned(name, scripts), "all")
        assert {a["version"] for a in answers(c, name)} == {"v1"}
        path = scripts / "versioned.py"
        path.write_text(path.read_text().replace('VERSION = "v1"', 'VERSION = "v2"'))
        same = c.load_inference(versioned(name, scripts), "all")  # equal settings, no force: left alone
        assert len(same) == 2 and {a["version"] for a in answers(c, name)} == {"v1"}
        c.load_inference(versioned(name, scripts, force_update=True), "all")
        assert {a["version"] for a in answers(c, name)} == {"v2"}
        c.unload_inference(name)


def test_restart_after_put_file_rolls_without_failing_a_request(fresh_manager, name, tmp_path):
    version = tmp_path / "version.txt"
    version.write_text("model-1\n")
    m = fresh_manager().start()
    with m.client() as c:
        c.load_inference(versioned(name), "all")
        c.put_file(name, {"file": str(version)})
        assert {a["file"] for a in answers(c, name)} == {""}  # read at start: not yet
        version.write_text("model-2\n")
        c.put_file(name, {"file": str(version)})
        with Load(c, name, threads=3) as load:
            wait_for(lambda: load.codes()[0] > 20)
            restarted = c.restart_inference(name)
            assert sorted(h.allocated_coprocessor for h in restarted) == ["b2", "local"]
            # The load goes on after the restart, answered on both boards.
            restarted_at = time.monotonic()
            wait_for(lambda: {board for board, _ in load.served_since(restarted_at)} == {"b2", "local"})
        load.check_all_ended(allowed=set())
        assert {a["file"] for a in answers(c, name)} == {"model-2"}
        # The CLI's restart, one board in place.
        out = subprocess.run([sys.executable, "-m", "infinibrain.cli", "--port", str(m.port), "restart", name, "--board", "b2",
                              "--quiet"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "restarted on b2" in out.stdout, out.stderr
        assert {a["file"] for a in answers(c, name)} == {"model-2"}  # put files survive restarts
        c.unload_inference(name)


# ---- healing ---------------------------------------------------------------------------------------


def test_a_hung_container_gets_no_requests_and_is_restarted(fresh_manager, name):
    m = fresh_manager(liveness_timeout_ms=1500, container_heartbeat_ms=200).start()
    with m.client() as c:
        events = events_of(c)
        c.load_inference(echo_config(name, wait_queue_timeout=1000, max_send_num=1, run_option="--restart on-failure"), "all")
        hung_pid = next(a["pid"] for a in answers(c, name, 10) if a["board"] == "local")
        # A request that hangs the local container (its process lives, its Connector is stuck).
        b2 = next(h for h in c.get_container_handler(name) if h.allocated_coprocessor == "b2")
        b2.stop_distribution()
        c.infer_async(name, b"x", {"sleep": 600}, func=lambda *a: None)
        wait_for(lambda: any(r["state"] == "unhealthy" for r in _rows(c, name)), timeout=10)
        b2.start_distribution()
        row = next(r for r in _rows(c, name) if r["allocated_coprocessor"] == "local")
        assert "past its 1 s deadline" in row["why"]
        assert metric(m, "infinibrain_container_state", container=f"{name}-local", state="unhealthy") == 1
        # It gets no more requests: the other board answers all of them.
        assert {a["board"] for a in answers(c, name, 10)} == {"b2"}
        # Restarted (its policy allows it): a new process serves again.
        restart = wait_for(lambda: next((e for e in events if e[2] == "restart" and e[0] == 0), None), timeout=20)
        assert f"{name}-local" in restart[1] and "unhealthy" in restart[1]
        wait_for(lambda: any(a["board"] == "local" and a["pid"] != hung_pid for a in answers(c, name, 6)), timeout=10)
        c.unload_inference(name)


def test_a_silent_idle_container_is_unhealthy_and_recovers_when_it_beats(fresh_manager, name):
    m = fresh_manager(liveness_timeout_ms=1000, container_heartbeat_ms=200).start()
    with m.client() as c:
        c.load_inference(echo_config(name), "local")
        pid = c.infer(name, b"x")[0]["pid"]
        import os
        import signal

        os.kill(pid, signal.SIGSTOP)  # alive, but says nothing
        try:
            wait_for(lambda: any(r["state"] == "unhealthy" and "silent" in r["why"] for r in _rows(c, name)), timeout=10)
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: all(r["state"] == "ready" for r in _rows(c, name)), timeout=10)
        assert c.infer(name, b"x")[0]["pid"] == pid  # no restart policy: the same process, healthy again
        c.unload_inference(name)


def _rows(c, name: str) -> list[dict]:
    return c._client.command("get_container_status", {"inference_name": name}).wait()


# ---- boards in parallel -------------------------------------------------------------------------------


def test_four_boards_deploy_in_about_the_time_of_one(fresh_manager, name):
    m = fresh_manager(boards=("b1", "b2", "b3", "b4")).start()
    with m.client() as c:
        slow = dict(run_command="python slowstart.py")  # a 3 s model load
        started = time.monotonic()
        c.load_inference(echo_config(name + "1", **slow), "b1")
        one = time.monotonic() - started
        started = time.monotonic()
        handlers = c.load_inference(echo_config(name + "4", **slow), "all")
        four = time.monotonic() - started
        assert len(handlers) == 4 and all(h.deployment["seconds"] >= 3 for h in handlers)
        assert four < 2 * one, f"four boards took {four:.1f} s, one {one:.1f} s"  # one after another: 4x
        started = time.monotonic()
        c.unload_inference(name + "4")
        c.unload_inference(name + "1")


# ---- the router loop never dies ------------------------------------------------------------------------


def test_the_router_survives_faults_in_timers_hooks_and_calls(tmp_path):
    """A real manager in this process, on real sockets, with a timer, a timed call, a
    cross-thread call and a container-side hook that raise."""
    import threading

    from conftest import free_base_port
    from infinibrain import AICluster
    from infinibrain.manager.config import BoardConfig, ManagerConfig
    from infinibrain.manager.daemon import Manager

    config = ManagerConfig(port=free_base_port(), state_dir=str(tmp_path), metrics_port=-1, registry_port=1,
                           boards=(BoardConfig("local"),))
    manager = Manager(config)

    def broken_timer(now: float) -> None:
        raise RuntimeError("timer fault")

    def broken_stranger(wire_id: str, sub: str) -> None:
        raise RuntimeError("hook fault")

    manager.loop.every(broken_timer)
    manager.router.strangers = broken_stranger
    loop = threading.Thread(target=manager.run, daemon=True)
    loop.start()
    try:
        manager.loop.call_soon(lambda: 1 / 0)
        manager.loop.call_soon(manager.loop.call_later, 0.01, lambda: {}["missing"])
        # A Connector started by hand (no container identity) subscribes: the hook it reaches fails.
        import zmq

        ctx = zmq.Context()
        stray = ctx.socket(zmq.SUB)
        stray.linger = 0
        stray.subscribe(b"q/~stranger/echo")
        stray.connect(f"tcp://127.0.0.1:{config.port + 3}")
        # The loop goes on: a client connects and asks for the figures (both paths answered by the router thread).
        with AICluster(port=config.port, timeout=5) as c:
            errors = wait_for(lambda: (e := c.stats()["loop_errors"]).get("timed") and e)
            assert errors["timer"] >= 1 and errors["call"] == 1 and errors["timed"] == 1
            dropped = wait_for(lambda: c.stats()["dropped_by_port"].get("container-out"))
            assert dropped >= 1  # the subscription whose hook raised: counted, the loop goes on
            before = c.stats()["loop_errors"]["timer"]
            time.sleep(0.3)
            assert c.stats()["loop_errors"]["timer"] > before  # still ticking
        stray.close()
        ctx.term()
        assert loop.is_alive()  # the router thread outlived every fault
    finally:
        manager.stop()
        loop.join(10)
    assert not loop.is_alive()


# ---- SSH boards that share a home ----------------------------------------------------------------------


def test_two_ssh_boards_on_one_host_and_user_do_not_collide(ssh_boards, tmp_path, name):
    import os

    settings = ssh_boards.settings("b1")
    del settings["work_dir"]  # the default folder in the user's home, shared by both boards
    m = ssh_boards.manager(tmp_path / "m", boards=("b1",))
    # A second board reached exactly as b1: same host, port and user.
    m.config_path.write_text(m.config_path.read_text().replace("work_dir", "# work_dir")
                             + "[[coprocessor]]\nname = \"twin\"\n"
                             + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    home = os.path.expanduser("~")
    root = os.path.join(home, ".infinibrain", str(m.port))
    m.start()
    try:
        with m.client() as c:
            c.load_inference(echo_config(name), "all")
            served = {a["board"]: a["cwd"] for a in answers(c, name, 12)}
            assert set(served) == {"b1", "twin"}
            assert served["b1"].startswith(os.path.join(root, "b1")) and served["twin"].startswith(os.path.join(root, "twin"))
            c.unload_inference(name)
    finally:
        m.stop()
        m.cleanup()
        shutil.rmtree(root, ignore_errors=True)
