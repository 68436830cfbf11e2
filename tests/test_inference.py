"""Inference through a real manager and real process containers."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import SCRIPTS, echo_config, wait_for
from infinibrain import (
    ContainerConfig,
    ContainerHandler,
    InferenceModulesConfig,
    InferenceNameNotFoundException,
    InferenceResponse,
    InvalidArgumentException,
    InvalidInferenceNameException,
    NotImplementedException,
    UnknownException,
)


def test_infer_image_returns_the_containers_result(cluster, name):
    handler = cluster.load_inference(echo_config(name), "local")
    assert isinstance(handler, ContainerHandler)
    assert (handler.name, handler.allocated_coprocessor, handler.suffix_name) == (name, "local", f"{name}-local")
    image = np.arange(224 * 224 * 3, dtype=np.uint32).reshape(224, 224, 3).astype(np.uint8)
    result = cluster.infer_image(name, image, '{"threshold": 0.5}')
    assert result["shape"] == [224, 224, 3]
    assert result["dtype"] == "uint8"
    assert result["sum"] == int(image.astype(np.int64).sum())
    assert result["param"] == {"threshold": 0.5}
    assert result["board"] == "local"
    cluster.unload_inference(name)


def test_infer_returns_result_and_response(cluster, name):
    cluster.load_inference(echo_config(name), "local")
    result, response = cluster.infer(name, bytes(range(200)), {"k": "v"})
    assert isinstance(response, InferenceResponse)
    assert result["shape"] == [200] and result["sum"] == sum(range(200))
    assert response.inference_name == name
    assert response.request_no == result["request_no"]
    assert response.sub_inference_name == "echo"
    assert response.metadata == {"k": "v"}
    assert response.metadata_sys["container"] == f"{name}-local"
    stages = [s for s, _ in response.time_stamp]
    assert stages == ["client_send", "manager_receive", "manager_send", "container_receive", "container_send", "manager_result", "client_receive"]
    times = [t for _, t in response.time_stamp]
    assert times == sorted(times)
    assert response.elapsed_time[-1][0] == "total" and response.elapsed_time[-1][1] >= 0
    cluster.unload_inference(name)


def test_param_must_be_json_object(cluster, name):
    with pytest.raises(InvalidArgumentException) as err:
        cluster.infer("whatever", b"x", "{not json")
    assert err.value.code == 100 and "param" in str(err.value)


def test_bad_arguments_name_the_argument(cluster):
    cases = [
        (lambda: cluster.infer_image("", np.zeros(3)), "inference_name"),
        (lambda: cluster.infer_image("x", None), "image_data"),
        (lambda: cluster.infer_image("x", [1, 2, 3]), "image_data"),
        (lambda: cluster.infer("x", None), "in_data"),
        (lambda: cluster.infer("x", "text"), "in_data"),
        (lambda: cluster.load_inference(None, "local"), "container_config"),
        (lambda: cluster.load_inference(ContainerConfig(name="a"), None), "coprocessor_name"),
        (lambda: cluster.put_file("x", None), "file_info"),
        (lambda: cluster.put_file("", {"model": "/x"}), "inference_name"),
        (lambda: cluster.get_queue_info(request_no=-1), "request_no"),
        (lambda: cluster.get_queue_info(pid="me"), "pid"),
        (lambda: cluster.infer_image_async("x", np.zeros(3)), "func"),
        (lambda: cluster.get_container_handler_async(), "func"),
    ]
    for call, argument in cases:
        with pytest.raises(InvalidArgumentException) as err:
            call()
        assert err.value.code == 100, argument
        assert argument in str(err.value), (argument, str(err.value))


def test_unknown_inference_is_400(cluster):
    with pytest.raises(InferenceNameNotFoundException) as err:
        cluster.infer_image("no-such-inference", np.zeros((2, 2), np.uint8))
    assert err.value.code == 400


def test_input_none_is_403(cluster, name):
    cluster.load_inference(echo_config(name, input=None), "local")
    with pytest.raises(InvalidInferenceNameException) as err:
        cluster.infer(name, b"x")
    assert err.value.code == 403 and name in str(err.value)
    cluster.unload_inference(name)


def test_voice_and_text_are_not_implemented(cluster):
    for call in (cluster.infer_voice, cluster.infer_voice_async, cluster.infer_text, cluster.infer_text_async):
        with pytest.raises(NotImplementedException) as err:
            call("x", b"")
        assert err.value.code == 900


def test_unencodable_result_is_a_numbered_error(cluster, name):
    cluster.load_inference(echo_config(name), "local")
    with pytest.raises(UnknownException) as err:
        cluster.infer(name, b"x", {"bad_result": True})
    assert "cannot be sent" in str(err.value)
    assert cluster.infer(name, b"ok")[0]["shape"] == [2]  # the container goes on serving
    cluster.unload_inference(name)


def test_arrays_in_a_result_arrive_as_arrays(cluster, name):
    """A numpy array in a result reaches the caller as an array of its dtype and shape
    (not nested lists); numpy scalars and plain values stay plain (docs/PROTOCOL.md)."""
    cluster.load_inference(echo_config(name), "local")
    image = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)
    result = cluster.infer_image(name, image, {"arrays": True})
    rows = image.reshape(6, -1).astype(np.float32)
    assert isinstance(result["rows"], np.ndarray) and result["rows"].dtype == np.float32 and result["rows"].shape == (6, 15)
    assert np.array_equal(result["rows"], rows)
    assert np.array_equal(result["strided"], rows[:, ::2])  # a view of another layout arrives in order
    assert type(result["mean"]) is float and result["mean"] == pytest.approx(float(rows.mean()))
    assert result["plain"] == [1, "a"]
    results = []
    cluster.infer_image_async(name, image, {"arrays": True}, func=lambda *args: results.append(args))
    wait_for(lambda: results, timeout=10)
    assert np.array_equal(results[0][2]["rows"], rows)  # a callback gets arrays too
    cluster.unload_inference(name)


def test_sub_inference_name_chooses_the_module(cluster, name):
    modules = [InferenceModulesConfig(sub_inference_name="double"), InferenceModulesConfig(sub_inference_name="triple")]
    cfg = ContainerConfig(name=name, implementation_type="process", input="Main", output="Main", script_path=str(SCRIPTS),
                          run_command="python multi.py", inference_modules=modules)
    cluster.load_inference(cfg, "local")
    assert cluster.infer(name, b"abcd")[0] == {"module": "double", "value": 8}  # the first module by default
    result, response = cluster.infer(name, b"abcd", {"sub_inference_name": "triple"})
    assert result == {"module": "triple", "value": 12}
    assert response.sub_inference_name == "triple"
    with pytest.raises(InferenceNameNotFoundException) as err:
        cluster.infer(name, b"abcd", {"sub_inference_name": "quadruple"})
    assert err.value.code == 400 and "quadruple" in str(err.value)
    cluster.unload_inference(name)


def test_a_module_named_like_another_gets_only_its_own_requests(cluster, name):
    """A subscription is a prefix: "scale"'s Connector also hears "scale2"'s requests,
    and must leave them to "scale2"'s."""
    modules = [InferenceModulesConfig(sub_inference_name="scale"), InferenceModulesConfig(sub_inference_name="scale2")]
    cfg = ContainerConfig(name=name, implementation_type="process", input="Main", output="Main", script_path=str(SCRIPTS),
                          run_command="python prefixed.py", inference_modules=modules, max_send_num=4)
    cluster.load_inference(cfg, "local")
    served = [cluster.infer(name, b"x", {"sub_inference_name": "scale2"})[0]["module"] for _ in range(30)]
    assert served == ["scale2"] * 30
    assert cluster.infer(name, b"x", {"sub_inference_name": "scale"})[0]["module"] == "scale"
    cluster.unload_inference(name)


def test_output_none_completes_when_taken(cluster, name):
    cfg = echo_config(name, output=None, run_command="python sink.py")
    cluster.load_inference(cfg, "local")
    result, response = cluster.infer(name, b"12345")
    assert result is None and response.request_no
    handler = cluster.get_container_handler(name)[0]
    work = next(i["path"] for i in cluster.get_coprocessor_images(name)[0].images if i.get("inference_name") == name)
    wait_for(lambda: (open(f"{work}/received.txt").read() if __import__("os").path.exists(f"{work}/received.txt") else ""))
    assert open(f"{work}/received.txt").read().split() == [response.request_no, "5"]
    assert handler.output is None
    cluster.unload_inference(name)


def test_produced_results_reach_the_infer_callback(cluster, name):
    got = []
    cluster.set_callback(infer_callback=lambda code, msg, result, resp: got.append((code, result, resp.inference_name)))
    cluster.load_inference(echo_config(name, input=None, run_command="python producer.py"), "local")
    wait_for(lambda: len(got) >= 3)
    assert all(code == 0 and resp_name == name and "tick" in result for code, result, resp_name in got[:3])
    cluster.unload_inference(name)


def test_async_inference_with_func_and_with_set_callback(cluster, name):
    cluster.load_inference(echo_config(name), "local")
    done = threading.Event()
    seen: dict = {}

    def on_result(code, message, result, response):
        seen.update(code=code, result=result, rid=response.request_no, thread=threading.current_thread().name)
        done.set()

    rid = cluster.infer_image_async(name, np.ones((4, 4), np.uint8), {}, func=on_result)
    assert isinstance(rid, str) and rid.isdigit()
    assert done.wait(10)
    assert seen["code"] == 0 and seen["result"]["sum"] == 16 and seen["rid"] == rid
    assert seen["thread"] != threading.current_thread().name  # callbacks run on an SDK thread

    results = []
    cluster.set_callback(infer_callback=lambda code, message, result, response: results.append((code, response.request_no)))
    rids = [cluster.infer_async(name, b"abc") for _ in range(20)]
    wait_for(lambda: len(results) == 20)
    assert sorted(r for _, r in results) == sorted(rids) and all(code == 0 for code, _ in results)
    cluster.unload_inference(name)


def test_async_errors_reach_the_callback_with_the_same_code(cluster):
    got = []
    event = threading.Event()
    cluster.infer_async("no-such", b"x", func=lambda code, message, result, response: (got.append((code, message, result, response)), event.set()))
    assert event.wait(10)
    code, message, result, response = got[0]
    assert code == 400 and message.startswith("Unregistered InferenceName") and result is None
    assert response.inference_name == "no-such"


def test_a_raising_callback_does_not_stop_the_sdk(cluster, name):
    cluster.load_inference(echo_config(name), "local")
    calls = []

    def bad(code, message, result, response):
        calls.append(code)
        raise RuntimeError("application bug")

    for _ in range(3):
        cluster.infer_async(name, b"x", func=bad)
    wait_for(lambda: len(calls) == 3)
    assert cluster.infer(name, b"still works")[0]["shape"] == [11]
    cluster.unload_inference(name)


def test_many_threads_share_one_cluster(cluster, name):
    cluster.load_inference(echo_config(name, max_send_num=4), "all")
    errors, results = [], []

    def work(k: int) -> None:
        try:
            for i in range(25):
                image = np.full((8, 8), (k * 25 + i) % 256, np.uint8)
                r = cluster.infer_image(name, image, {"k": k, "i": i})
                assert r["sum"] == int(image.astype(np.int64).sum()) and r["param"] == {"k": k, "i": i}
                results.append(r["board"])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(results) == 200
    assert set(results) == {"local", "b2"}  # spread over both replicas
    cluster.unload_inference(name)


CLIENT = """
import sys, numpy as np
from infinibrain import AICluster
c = AICluster(port=int(sys.argv[1]))
ok = 0
for i in range(50):
    r = c.infer_image(sys.argv[2], np.full((16, 16), i, np.uint8), {"i": i})
    ok += r["param"] == {"i": i} and r["sum"] == 256 * i
c.release()
print(ok)
"""


def test_two_client_processes_at_once(cluster, manager, name):
    cluster.load_inference(echo_config(name), "all")
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, str(manager.port), name], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outs == ["50", "50"]
    cluster.unload_inference(name)


def test_set_logger_routes_the_sdks_logging(cluster, name):
    import logging

    assert isinstance(cluster.get_logger(), logging.Logger)
    records = []
    mine = logging.getLogger(f"app.{name}")
    mine.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r)})())
    cluster.set_logger(mine)
    assert cluster.get_logger() is mine
    with pytest.raises(InvalidArgumentException):
        cluster.set_logger("not a logger")
    cluster.load_inference(echo_config(name), "local")
    done = threading.Event()

    def bad(*args):
        done.set()
        raise RuntimeError("application bug")

    cluster.infer_async(name, b"x", func=bad)
    assert done.wait(10)
    wait_for(lambda: records)
    assert "raised" in records[0].getMessage() and records[0].exc_info[0] is RuntimeError
    cluster.unload_inference(name)
