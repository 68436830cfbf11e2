"""Management APIs against a real manager: boards, containers, files, errors."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest

from conftest import SCRIPTS, echo_config, wait_for
from infinibrain import (
    APIConflictException,
    ContainerConfig,
    ContainerDistributionStatus,
    ContainerHandler,
    ContainerNotFoundException,
    ContainerStatus,
    CoprocessorHandler,
    CoprocessorImages,
    CoprocessorNotFoundException,
    InferenceNameNotFoundException,
    InvalidArgumentException,
    InvalidOperationException,
)


def boards_serving(cluster, name, n=40):
    return Counter(cluster.infer(name, b"x")[0]["board"] for _ in range(n))


def test_load_on_all_spreads_and_handlers_describe_it(cluster, name):
    handlers = cluster.load_inference(echo_config(name, max_send_num=3, image_tag="echo:1"), "all")
    assert sorted(h.allocated_coprocessor for h in handlers) == ["b2", "local"]
    h = handlers[0]
    assert h.host_location == ["local", "b2"] and h.max_send_num == 3 and h.image_tag == "echo:1"
    assert h.implementation_type == "process" and h.input == "Main" and h.script_path == str(SCRIPTS)
    assert h.inference_modules.sub_inference_name == "echo" and h.inference_modules.script == "echo.py"
    assert [x.suffix_name for x in cluster.get_container_handler(name)] == [f"{name}-b2", f"{name}-local"]
    assert set(boards_serving(cluster, name)) == {"local", "b2"}

    boards = cluster.get_coprocessor_handler(name)
    assert all(isinstance(b, CoprocessorHandler) for b in boards)
    assert sorted(b.name for b in boards) == ["b2", "local"] and boards[0].ip == "127.0.0.1"
    assert sorted(b.name for b in cluster.get_coprocessor_handler()) == ["b2", "local"]

    images = cluster.get_coprocessor_images(name)
    assert all(isinstance(i, CoprocessorImages) for i in images)
    ours = [img for img in images[0].images if img.get("inference_name") == name]
    assert [img["tag"] for img in ours] == ["echo:1"] and ours[0]["size"] > 0

    statuses = cluster.get_container_status(name)
    assert all(isinstance(s, ContainerStatus) for s in statuses)
    s = statuses[0]
    assert s.status == "running" and s.connect_status == "connected" and s.operate == "Free"
    assert s.mem_usage.endswith("MB") and float(s.mem_proc.rstrip("%")) > 0 and s.cpu_proc.endswith("%")
    assert s.created and "/tcp" in s.ports and " / " in s.net_io and s.block_io
    cluster.unload_inference(name)


def test_distribution_per_container_and_per_board(cluster, name):
    cluster.load_inference(echo_config(name), "all")
    local = next(h for h in cluster.get_container_handler(name) if h.allocated_coprocessor == "local")
    off = local.stop_distribution()
    assert isinstance(off, ContainerDistributionStatus) and (off.name, off.suffix_name, off.distribution) == (name, f"{name}-local", "off")
    assert set(boards_serving(cluster, name, 20)) == {"b2"}
    assert local.start_distribution().distribution == "on"
    assert set(boards_serving(cluster, name)) == {"local", "b2"}

    b2 = next(b for b in cluster.get_coprocessor_handler() if b.name == "b2")
    status = b2.stop_distribution(name)
    assert status.suffix_name == f"{name}-b2" and status.distribution == "off"
    assert set(boards_serving(cluster, name, 20)) == {"local"}
    everything = b2.start_distribution()  # "" = every inference on the board
    rows = everything if isinstance(everything, list) else [everything]
    assert {r.suffix_name for r in rows} >= {f"{name}-b2"} and all(r.distribution == "on" for r in rows)
    cluster.unload_inference(name)


def test_container_stop_and_start(cluster, name):
    handler = cluster.load_inference(echo_config(name), "local")
    pid_before = cluster.infer(name, b"x")[0]["pid"]
    stopped = handler.stop()
    assert isinstance(stopped, ContainerStatus)
    assert stopped.status == "stopped" and stopped.connect_status == "disconnected" and stopped.operate == "Unknown"
    started = handler.start()
    assert started.status == "running" and started.connect_status == "connected"
    assert cluster.infer(name, b"x")[0]["pid"] != pid_before
    cluster.unload_inference(name)


def test_add_inference_to_a_board(cluster, name):
    cluster.load_inference(echo_config(name), "local")
    b2 = next(b for b in cluster.get_coprocessor_handler() if b.name == "b2")
    on_board = b2.add_inference(name)
    assert f"{name}-b2" in [h.suffix_name for h in on_board] and all(h.allocated_coprocessor == "b2" for h in on_board)
    assert set(boards_serving(cluster, name)) == {"local", "b2"}
    assert sorted(b.name for b in cluster.get_coprocessor_handler(name)) == ["b2", "local"]
    assert any(img.get("inference_name") == name for img in b2.get_images()[0].images)
    cluster.unload_inference(name, "b2")  # unload from one board only
    assert [h.allocated_coprocessor for h in cluster.get_container_handler(name)] == ["local"]
    cluster.unload_inference(name)


def test_put_file_replaces_files_and_checks_keys(cluster, name, tmp_path):
    cluster.load_inference(echo_config(name), "local")
    model = tmp_path / "weights.bin"
    model.write_bytes(b"v1")
    assert cluster.put_file(name, {"model": str(model)}) is None
    work = next(i["path"] for i in cluster.get_coprocessor_images(name)[0].images if i.get("inference_name") == name)
    assert open(os.path.join(work, "weights.bin"), "rb").read() == b"v1"
    model.write_bytes(b"v2")
    cluster.put_file(name, {"model": str(model), "To": "/models/"})
    assert open(os.path.join(work, "models", "weights.bin"), "rb").read() == b"v2"
    assert "weights.bin" in cluster.infer(name, b"x")[0]["cwd_files"]

    with pytest.raises(InvalidArgumentException) as err:
        cluster.put_file(name, {"modle": str(model)})
    assert err.value.code == 101 and "modle" in str(err.value)
    with pytest.raises(InvalidArgumentException) as err:
        cluster.put_file(name, {"model": str(tmp_path / "missing.bin")})
    assert err.value.code == 301 and "missing.bin" in str(err.value)
    with pytest.raises(InvalidArgumentException) as err:
        cluster.put_file(name, {"model": str(model), "To": "../../escape"})
    assert err.value.code == 302 and "outside" in str(err.value)
    with pytest.raises(InferenceNameNotFoundException) as err:
        cluster.put_file("nope", {"model": str(model)})
    assert err.value.code == 300

    got = []
    ev = threading.Event()
    cluster.put_file_async(name, {"bogus": "x"}, func=lambda *a: (got.append(a), ev.set()))
    assert ev.wait(5) and got[0][0] == 101 and got[0][2] == "put_file"

    # Refused while the inference is in use.
    done = threading.Event()
    cluster.infer_async(name, b"x", {"sleep": 1.0}, func=lambda *a: done.set())
    wait_for(lambda: cluster.get_container_status(name)[0].send_data_num == 1)  # it runs in the container
    with pytest.raises(InvalidOperationException) as err:
        cluster.put_file(name, {"model": str(model)})
    assert err.value.code == 303
    assert done.wait(10)
    cluster.unload_inference(name)


def test_unload_in_use_is_303_and_unknown_names(cluster, name):
    cluster.load_inference(echo_config(name), "local")
    done = threading.Event()
    cluster.infer_async(name, b"x", {"sleep": 1.0}, func=lambda *a: done.set())
    wait_for(lambda: cluster.get_container_status(name)[0].send_data_num == 1)  # it runs in the container
    with pytest.raises(InvalidOperationException) as err:
        cluster.unload_inference(name)
    assert err.value.code == 303
    assert done.wait(10)
    with pytest.raises(CoprocessorNotFoundException) as err:
        cluster.unload_inference(name, "nowhere")
    assert err.value.code == 304
    remaining = cluster.unload_inference(name)
    assert all(isinstance(h, ContainerHandler) for h in remaining)
    assert name not in [h.name for h in remaining]
    with pytest.raises(InferenceNameNotFoundException) as err:
        cluster.unload_inference(name)
    assert err.value.code == 300
    for call in (cluster.get_container_handler, cluster.get_container_status, cluster.get_coprocessor_handler,
                 cluster.get_coprocessor_images, cluster.get_queue_info):
        with pytest.raises(InferenceNameNotFoundException):
            call(name)


def test_load_validation_errors(cluster, name, tmp_path):
    cases = [
        (ContainerConfig(implementation_type="process"), 201, "name"),
        (ContainerConfig(name="bad name!"), 302, "name"),
        (ContainerConfig(name=name, implementation_type="vm"), 302, "implementation_type"),
        (ContainerConfig(name=name, implementation_type="process", input="Sensor"), 302, "input"),
        (ContainerConfig(name=name, implementation_type="process", max_send_num=0), 302, "max_send_num"),
        (ContainerConfig(name=name, implementation_type="process", send_timeout=-5), 302, "send_timeout"),
        (ContainerConfig(name=name, implementation_type="process", script_path="relative/dir"), 302, "script_path"),
        (ContainerConfig(name=name, implementation_type="process", copy={"From": str(tmp_path)}), 201, "copy.To"),
        (ContainerConfig(name=name, implementation_type="process", copy={"From": "/no/such", "To": "/x"}), 302, "copy.From"),
        (ContainerConfig(name=name, implementation_type="process", run_command="python 'unterminated"), 302, "run_command"),
        (ContainerConfig(name=name, implementation_type="docker"), 302, "docker"),
        ("{broken json", 200, "container_config"),
    ]
    for cfg, code, needle in cases:
        with pytest.raises(InvalidArgumentException) as err:
            cluster.load_inference(cfg, "local")
        assert err.value.code == code, (cfg, err.value)
        assert needle in str(err.value), (needle, str(err.value))
    with pytest.raises(CoprocessorNotFoundException) as err:
        cluster.load_inference(echo_config(name), ["local", "nowhere"])
    assert err.value.code == 304 and "nowhere" in str(err.value)
    assert cluster.get_container_handler() == [] or name not in [h.name for h in cluster.get_container_handler()]


def test_a_container_that_fails_to_start_leaves_nothing(cluster, name):
    with pytest.raises(InvalidArgumentException) as err:
        cluster.load_inference(echo_config(name, run_command="python failstart.py"), "local")
    assert err.value.code == 302
    assert "exited with status 7" in str(err.value) and "model file missing" in str(err.value)
    assert name not in [h.name for h in cluster.get_container_handler()]
    with pytest.raises(InvalidArgumentException) as err:
        cluster.load_inference(echo_config(name, run_command="no-such-program --x"), "local")
    assert "no-such-program" in str(err.value)


def test_reload_same_settings_tag_change_and_force_update(cluster, name):
    cluster.load_inference(echo_config(name, image_tag="v1"), "local")
    again = cluster.load_inference(echo_config(name, image_tag="v1"), "local")  # same settings: nothing to do
    assert again.suffix_name == f"{name}-local"
    with pytest.raises(InvalidArgumentException) as err:
        cluster.load_inference(echo_config(name, image_tag="v2"), "local")
    assert err.value.code == 203 and "v1" in str(err.value) and "v2" in str(err.value)
    with pytest.raises(InvalidArgumentException) as err:
        cluster.load_inference(echo_config(name, image_tag="v1", max_send_num=5), "local")
    assert err.value.code == 302 and "force_update" in str(err.value)
    updated = cluster.load_inference(echo_config(name, image_tag="v2", force_update=True, max_send_num=5), "local")
    assert updated.image_tag == "v2" and updated.max_send_num == 5
    assert cluster.infer(name, b"x")[0]["shape"] == [1]
    cluster.unload_inference(name)


def test_second_command_on_a_busy_inference_is_309(cluster, name):
    cluster.load_inference(echo_config(name), "local")
    handler = cluster.get_container_handler(name)[0]
    outcomes = []
    ev = threading.Event()
    handler.stop_async(func=lambda code, msg, cmd, result: (outcomes.append((code, cmd, result)), ev.set()))
    with pytest.raises(APIConflictException) as err:
        cluster.reload_inference(name)
    assert err.value.code == 309 and name in str(err.value)
    assert ev.wait(20)
    assert outcomes[0][0] == 0 and outcomes[0][1] == "stop" and isinstance(outcomes[0][2], ContainerStatus)
    handler.start()
    cluster.unload_inference(name)


def test_container_and_board_not_found(cluster, name):
    cluster.load_inference(echo_config(name), "local")
    handler = cluster.get_container_handler(name)[0]
    ghost = ContainerHandler(cluster, name=name, suffix_name="ghost", allocated_coprocessor="local")
    with pytest.raises(ContainerNotFoundException) as err:
        ghost.stop_distribution()
    assert err.value.code == 307
    lost_board = ContainerHandler(cluster, name=name, suffix_name=handler.suffix_name, allocated_coprocessor="mars")
    with pytest.raises(CoprocessorNotFoundException):
        lost_board.start()
    with pytest.raises(InferenceNameNotFoundException):
        handler.start_distribution("not-registered")
    board = CoprocessorHandler(cluster, "mars", "10.0.0.1")
    for call in (board.get_images, board.start_distribution, lambda: board.add_inference(name)):
        with pytest.raises(CoprocessorNotFoundException):
            call()
    cluster.unload_inference(name)


def test_manage_callback_gets_cmd_and_converted_result(cluster, name):
    got = []
    ev = threading.Event()
    cluster.set_callback(manage_callback=lambda code, msg, cmd, result: (got.append((code, msg, cmd, result)), ev.set()))
    rid = cluster.load_inference_async(echo_config(name), "local")
    assert rid.isdigit()
    assert ev.wait(30)
    code, msg, cmd, result = got[0]
    assert (code, cmd) == (0, "load_inference") and isinstance(result, ContainerHandler)
    ev.clear()
    cluster.get_container_status_async("nope")
    assert ev.wait(10)
    assert got[1][:3] == (300, got[1][1], "get_container_status") and got[1][3] is None
    assert got[1][1].startswith("Specified InferenceName dose not exist")
    cluster.unload_inference(name)


def test_loop_and_other_implementation_types(cluster, manager, name):
    cluster.load_inference(ContainerConfig(name=name, implementation_type="Loop", input="Main", output="Main"), "local")
    r = cluster.infer_image(name, np.zeros((3, 5), np.float32), {"x": 1})
    assert r == {"bytes": 60, "shape": [3, 5], "dtype": "<f4", "param": {"x": 1}, "sub_inference_name": name}
    cluster.unload_inference(name)

    other = name + "x"
    handler = cluster.load_inference(echo_config(other, implementation_type="other"), "local")
    assert cluster.get_container_status(other)[0].status == "external"
    env = dict(os.environ, INFINIBRAIN_CONTAINER=handler.suffix_name, ECHO_SUB="echo")
    cmd = [sys.executable, str(SCRIPTS / "echo.py")]
    # Started by hand with explicit Connector arguments through the environment.
    env.update(INFINIBRAIN_HOST="127.0.0.1", INFINIBRAIN_PUB_PORT=str(manager.port + 4), INFINIBRAIN_SUB_PORT=str(manager.port + 3))
    proc = subprocess.Popen(cmd, env=env, cwd=SCRIPTS)
    try:
        wait_for(lambda: cluster.get_container_status(other)[0].connect_status == "connected", timeout=20)
        assert cluster.infer(other, b"abc")[0]["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    cluster.unload_inference(other)


def test_a_slow_deployment_does_not_hold_up_requests(cluster, name):
    cluster.load_inference(echo_config(name), "local")
    loaded = threading.Event()
    outcome = []
    cluster.load_inference_async(echo_config(name + "s", run_command="python slowstart.py"), "local",
                                 func=lambda code, msg, cmd, result: (outcome.append(code), loaded.set()))
    served_while_loading = 0
    deadline = time.monotonic() + 30
    while not loaded.is_set() and time.monotonic() < deadline:
        assert cluster.infer(name, b"x")[0]["shape"] == [1]
        served_while_loading += 1 if not loaded.is_set() else 0
    assert loaded.wait(30) and outcome == [0]
    # The load took three seconds; requests to the other inference went on meanwhile.
    assert served_while_loading >= 10
    assert cluster.infer(name + "s", b"y")[0] == "slow ready"
    cluster.unload_inference(name + "s")
    cluster.unload_inference(name)



def test_requests_waiting_for_a_load_that_fails_are_answered(cluster, name):
    outcome = []
    loaded = threading.Event()
    answered = threading.Event()
    cluster.load_inference_async(echo_config(name, run_command="python slowfail.py", send_timeout=60000), "local",
                                 func=lambda code, msg, cmd, result: (outcome.append((code, msg)), loaded.set()))
    wait_for(lambda: name in [h.name for h in cluster.get_container_handler()], timeout=10)
    got = []
    cluster.infer_async(name, b"x", func=lambda code, msg, result, resp: (got.append((code, msg)), answered.set()))
    assert loaded.wait(30) and answered.wait(30)
    assert outcome[0] == (302, "Specified Param Error")  # the callback gets the reference's text
    assert got == [(400, "Unregistered InferenceName")]
    assert name not in [h.name for h in cluster.get_container_handler()]
