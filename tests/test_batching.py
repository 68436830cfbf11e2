"""Dynamic batching: a real manager groups waiting requests for a container that asks for
batches (tests/scripts/batcher.py); each request still ends on its own."""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import echo_config, wait_for
from infinibrain import ContainerDisconnectException, InferenceModulesConfig, InvalidArgumentException, UnknownException


def batch_config(name: str, **kw):
    base = dict(inference_modules=InferenceModulesConfig(sub_inference_name="batcher", script="batcher.py"),
                max_batch_size=8, max_send_num=1)
    base.update(kw)
    return echo_config(name, **base)


def image(n: int) -> np.ndarray:
    return np.full((4, 4), n, np.uint8)


def occupy_then_send(cluster, name: str, count: int, param: dict | None = None) -> list:
    """Keep the container busy with one slow request, queue ``count`` more behind it, and
    return all the futures (the slow one first)."""
    slow = cluster.infer_image_future(name, image(0), {"n": "slow", "sleep": 0.5})
    # It has gone to the container (alone in its batch): the others wait in the manager.
    wait_for(lambda: cluster.get_container_status(name)[0].send_data_num == 1)
    return [slow] + [cluster.infer_image_future(name, image(i), {"n": i, **(param or {}).get(i, {})}) for i in range(1, count + 1)]


def test_waiting_requests_go_to_the_container_in_one_batch(cluster, name):
    cluster.load_inference(batch_config(name), "local")
    futures = occupy_then_send(cluster, name, 8)
    results = [f.result(timeout=20) for f in futures]
    assert results[0]["batch"] == 1
    rest = results[1:]
    assert [r["n"] for r in rest] == list(range(1, 9))  # each caller gets its own answer
    assert [r["sum"] for r in rest] == [16 * i for i in range(1, 9)]  # computed from its own image
    assert {r["batch"] for r in rest} == {8} and [r["index"] for r in rest] == list(range(8))
    assert len({r["rid"] for r in rest}) == 8
    cluster.unload_inference(name)


def test_batches_never_exceed_max_batch_size(cluster, name):
    cluster.load_inference(batch_config(name, max_batch_size=3), "local")
    results = [f.result(timeout=20) for f in occupy_then_send(cluster, name, 7)][1:]
    assert sorted(r["n"] for r in results) == list(range(1, 8))
    assert max(r["batch"] for r in results) == 3
    cluster.unload_inference(name)


def test_an_error_ends_only_its_own_request(cluster, name):
    cluster.load_inference(batch_config(name), "local")
    futures = occupy_then_send(cluster, name, 4, {3: {"fail": True}})
    with pytest.raises(UnknownException) as err:
        futures[3].result(timeout=20)
    assert err.value.code == 999 and "request 3 asked to fail" in err.value.detail
    ok = [futures[i].result(timeout=20) for i in (1, 2, 4)]
    assert [r["n"] for r in ok] == [1, 2, 4] and {r["batch"] for r in ok} == {4}
    cluster.unload_inference(name)


def test_a_container_lost_mid_batch_ends_every_request_of_it(cluster, name):
    cluster.load_inference(batch_config(name), "local")
    futures = occupy_then_send(cluster, name, 4, {2: {"crash": True}})
    assert futures[0].result(timeout=20)["n"] == "slow"
    for f in futures[1:]:
        with pytest.raises(ContainerDisconnectException):
            f.result(timeout=30)
    cluster.unload_inference(name)


def test_max_queue_delay_holds_a_short_batch(cluster, name):
    cluster.load_inference(batch_config(name, max_batch_size=4, max_queue_delay=1500), "local")
    started = time.monotonic()
    futures = [cluster.infer_image_future(name, image(i), {"n": i}) for i in range(2)]
    results = [f.result(timeout=20) for f in futures]
    assert time.monotonic() - started >= 1.5  # the manager waited for more before sending
    assert [r["batch"] for r in results] == [2, 2]
    # A full batch does not wait.
    full = [f.result(timeout=20) for f in [cluster.infer_image_future(name, image(i), {"n": i}) for i in range(4)]]
    assert [r["batch"] for r in full] == [4] * 4 and [r["n"] for r in full] == [0, 1, 2, 3]
    cluster.unload_inference(name)


def test_a_program_that_does_not_ask_for_batches_gets_single_requests(cluster, name):
    cluster.load_inference(echo_config(name, max_batch_size=8), "local")
    futures = [cluster.infer_image_future(name, image(i), {"n": i}) for i in range(10)]
    results = [f.result(timeout=20) for f in futures]
    assert [r["sum"] for r in results] == [16 * i for i in range(10)]
    assert results[0]["env"]["INFINIBRAIN_MAX_BATCH_SIZE"] == "8"
    cluster.unload_inference(name)


@pytest.mark.parametrize("settings, named", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_batch_size": "8"}, "max_batch_size"),
    ({"max_queue_delay": 5}, "max_queue_delay"),
    ({"max_batch_size": 4, "max_queue_delay": -1}, "max_queue_delay"),
])
def test_bad_batching_settings_are_refused_by_name(cluster, name, settings, named):
    with pytest.raises(InvalidArgumentException) as err:
        cluster.load_inference(batch_config(name, **{"max_batch_size": None, **settings}), "local")
    assert named in err.value.detail
