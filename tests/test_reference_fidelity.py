"""Code written to the SDK reference runs unchanged: return shapes, the Connector's own
arguments, the reference's messages, errors raised where its tables say, safe buffers."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import SCRIPTS, echo_config, wait_for
from infinibrain import (AICluster, ContainerDistributionStatus, ContainerHandler, ContainerDisconnectException,
                         InvalidArgumentException, InvalidInferenceNameException)
from infinibrain.errors import ConnectionFailedException, InfinibrainException


def test_return_shapes_follow_the_arguments_only(fresh_manager, name):
    m = fresh_manager().start()
    with m.client() as c:
        assert [h.allocated_coprocessor for h in c.load_inference(echo_config(name), "all")] == ["local", "b2"]
        # One config on one named board: that board's ContainerHandler, though b2 has one too.
        one = c.load_inference(echo_config(name), "local")
        assert isinstance(one, ContainerHandler) and one.allocated_coprocessor == "local"
        listed = c.load_inference(echo_config(name), ["b2"])
        assert isinstance(listed, list) and [h.allocated_coprocessor for h in listed] == ["b2"]
        reloaded = c.reload_inference(name)
        assert isinstance(reloaded, list) and sorted(h.allocated_coprocessor for h in reloaded) == ["b2", "local"]
        board = next(b for b in c.get_coprocessor_handler() if b.name == "local")
        assert isinstance(board.stop_distribution(name), ContainerDistributionStatus)
        everything = board.start_distribution()  # "": every inference on the board, always a list
        assert isinstance(everything, list) and [s.suffix_name for s in everything] == [f"{name}-local"]
        c.unload_inference(name, "b2")
        single = c.reload_inference(name)
        assert isinstance(single, list) and len(single) == 1  # one board left: still a list
        c.unload_inference(name)


def test_a_connector_given_all_five_arguments_needs_no_environment(fresh_manager, name):
    m = fresh_manager().start()
    with m.client() as c:
        c.load_inference(echo_config(name, implementation_type="other"), "local")
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFINIBRAIN_")}
        proc = subprocess.Popen([sys.executable, str(SCRIPTS / "explicit.py"), "echo", "127.0.0.1", str(m.port + 4),
                                 str(m.port + 3)], env=env)
        try:
            wait_for(lambda: c.get_container_status(name)[0].connect_status == "connected", timeout=20)
            result, response = c.infer(name, b"abc")
            assert result == {"pid": proc.pid, "got": 3, "sub": "echo"} and response.metadata_sys["container"] == f"{name}-local"
        finally:
            proc.kill()
            proc.wait()
        wait_for(lambda: c.get_container_status(name)[0].connect_status == "disconnected", timeout=10)
        c.unload_inference(name)


def test_messages_are_the_references_and_the_detail_says_what_was_wrong(cluster, name):
    with pytest.raises(InvalidArgumentException) as err:
        cluster.load_inference(echo_config(name, max_send_num=0), "local")
    assert err.value.message == "Specified Param Error" and "max_send_num" in err.value.detail
    assert str(err.value) == f"[302] Specified Param Error: {err.value.detail}"
    got: list = []
    done = threading.Event()
    cluster.get_container_handler_async("nope", func=lambda code, msg, cmd, result: (got.append((code, msg)), done.set()))
    assert done.wait(10) and got == [(300, "Specified InferenceName dose not exist")]


def test_403_is_raised_by_every_form_and_reaches_the_callback(cluster, name):
    cluster.load_inference(echo_config(name, input=None), "local")
    seen: list = []
    cluster.set_callback(infer_callback=lambda code, msg, result, resp: seen.append((code, msg)))
    for call in (lambda: cluster.infer_image_async(name, np.zeros((2, 2), np.uint8)),
                 lambda: cluster.infer_async(name, b"x"),
                 lambda: cluster.infer_image(name, np.zeros((2, 2), np.uint8)),
                 lambda: cluster.infer(name, b"x")):
        with pytest.raises(InvalidInferenceNameException) as err:
            call()
        assert err.value.code == 403 and err.value.message == f"{name} does not accept data."
    wait_for(lambda: len(seen) == 4)
    assert seen == [(403, f"{name} does not accept data.")] * 4
    # Other refusals of an _async call go to the callback only.
    seen.clear()
    assert cluster.infer_async("no-such-inference", b"x").isdigit()
    wait_for(lambda: seen == [(400, "Unregistered InferenceName")])
    cluster.unload_inference(name)


def test_402_of_infer_async_is_raised_at_call_time(fresh_manager, name):
    m = fresh_manager(heartbeat_interval_ms=200).start()
    c = m.client()
    try:
        c.load_inference(echo_config(name), "local")
        seen: list = []
        events: list = []
        c.set_callback(infer_callback=lambda code, msg, result, resp: seen.append(code),
                       manage_callback=lambda code, msg, cmd, result: events.append(code))
        m.kill()
        wait_for(lambda: 112 in events, timeout=10)  # the connection is lost
        with pytest.raises(ContainerDisconnectException) as err:
            c.infer_async(name, b"x")
        assert err.value.code == 402 and err.value.message == "Response Disconnect Error"
        wait_for(lambda: seen == [402])  # and the callback has it too
        with pytest.raises(ConnectionFailedException):  # infer_image_async: 111 (no 402 in its table)
            c.infer_image_async(name, np.zeros((2, 2), np.uint8))
    finally:
        c.release()


def test_an_async_request_sends_what_the_buffer_held_at_call_time(cluster, name):
    cluster.load_inference(echo_config(name, max_send_num=4), "local")
    frame = np.zeros((120, 160, 3), np.uint8)  # a camera loop reusing one buffer
    sums: dict[str, int] = {}
    answers: dict[str, int] = {}
    done = threading.Semaphore(0)

    def on_result(code, message, result, response):
        answers[response.request_no] = result["sum"] if code == 0 else -code
        done.release()

    for k in range(1, 41):
        frame[...] = k % 250
        rid = cluster.infer_image_async(name, frame, func=on_result)
        sums[rid] = int(frame.astype(np.int64).sum())
        frame[...] = 255  # the next pixels arrive before this request has left
    for _ in sums:
        assert done.acquire(timeout=30)
    assert answers == sums
    # A read-only array goes without a copy and arrives as it was.
    ro = np.full((4, 4), 7, np.uint8)
    ro.setflags(write=False)
    assert cluster.infer_image_future(name, ro).result(10)["sum"] == 7 * 16
    cluster.unload_inference(name)


def test_log_setting_formats_records_with_and_without_a_code(tmp_path):
    script = (
        "import logging\n"
        "from infinibrain.containers import log_setting, info\n"
        "log_setting('model')\n"
        "logging.getLogger('model.loader').warning('plain record from a library')\n"
        "logging.getLogger('model').info('plain record')\n"
        "info('with a code', code=7)\n"
        "info('without a code')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    err = out.stderr
    assert "Logging error" not in err and "KeyError" not in err, err
    assert "WARNING model.loader: plain record from a library" in err and "INFO model: plain record" in err
    assert "INFO [7] model: with a code" in err and "INFO model: without a code" in err and "[-1]" not in err


def test_set_logger_takes_a_logger_adapter(cluster):
    adapter = logging.LoggerAdapter(logging.getLogger("app"), {"tenant": "a"})
    cluster.set_logger(adapter)
    assert cluster.get_logger() is adapter
    with pytest.raises(InvalidArgumentException):
        cluster.set_logger("not a logger")  # type: ignore[arg-type]
    cluster.set_logger(logging.getLogger("infinibrain.inference"))


def test_timeouts_default_to_the_managers_and_zero_means_no_limit(fresh_manager, name):
    m = fresh_manager(default_wait_queue_timeout_ms=1000).start()
    with m.client() as c:
        handler = c.load_inference(echo_config(name), "local")
        assert handler.wait_queue_timeout == 1000 and handler.send_timeout == 10000  # the manager's defaults
        with pytest.raises(InfinibrainException) as err:
            c.infer(name, b"x", {"sleep": 2})
        assert err.value.code == 401
        c.unload_inference(name)
    m.stop()
    m2 = fresh_manager(default_wait_queue_timeout_ms=0).start()
    with m2.client() as c:
        handler = c.load_inference(echo_config(name), "local")
        assert handler.wait_queue_timeout is None  # no limit
        assert c.infer(name, b"x", {"sleep": 2})[0]["shape"] == [1]
        c.unload_inference(name)


def test_the_connection_is_checked_before_the_arguments(fresh_manager):
    m = fresh_manager().start()
    c = m.client()
    c.release()
    for call in (lambda: c.load_inference(None, None), lambda: c.unload_inference(123),  # type: ignore[arg-type]
                 lambda: c.get_container_handler(5), lambda: c.put_file(None, None),  # type: ignore[arg-type]
                 lambda: c.get_queue_info(request_no="x"), lambda: c.infer(None, None),  # type: ignore[arg-type]
                 lambda: c.reload_inference(None)):  # type: ignore[arg-type]
        with pytest.raises(ConnectionFailedException):
            call()


def test_the_managers_own_figures_are_public(cluster, name):
    cluster.load_inference(echo_config(name), "local")
    cluster.infer(name, b"x")
    stats = cluster.stats()
    assert {"dropped_frames", "clients", "queued", "in_flight", "rss_bytes", "loop_errors"} <= set(stats)
    assert stats["clients"] >= 1 and stats["rss_bytes"] > 0
    cluster.unload_inference(name)
