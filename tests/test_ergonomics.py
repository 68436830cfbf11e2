"""What modern Python clients give, beside the reference's API: a context manager,
futures (and asyncio through them), retries with backoff, waiting for the manager, and a
public API that type-checks."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, ManagerProcess, echo_config, wait_for
from infinibrain import AICluster, RetryPolicy, wait_for_manager
from infinibrain.errors import (
    APIConflictException,
    ConnectionFailedException,
    InfinibrainException,
    SendQueueTimeoutException,
    SocketConnectionException,
)


def test_context_manager_releases(manager):
    with AICluster(port=manager.port) as c:
        assert c.get_coprocessor_handler()
    with pytest.raises(ConnectionFailedException):
        c.get_coprocessor_handler()


def test_futures_and_asyncio_on_the_same_core(cluster, name):
    stages: list[str] = []
    handler = cluster.load_inference_future(echo_config(name), "local", on_progress=lambda cmd, info: stages.append(info["stage"])).result(30)
    assert handler.suffix_name == f"{name}-local"
    wait_for(lambda: stages == ["preparing", "starting", "ready"])
    images = [np.full((8, 8, 3), i, np.uint8) for i in range(20)]
    futures = [cluster.infer_image_future(name, img) for img in images]
    assert [f.result(10)["sum"] for f in futures] == [int(img.sum()) for img in images]
    result, response = cluster.infer_future(name, b"abc").result(10)
    assert result["shape"] == [3] and response.inference_name == name

    async def main() -> list:
        return await asyncio.gather(*(asyncio.wrap_future(cluster.infer_image_future(name, img)) for img in images[:5]),
                                    asyncio.wrap_future(cluster.get_container_status_future(name)))

    *results, statuses = asyncio.run(main())
    assert [r["sum"] for r in results] == [int(img.sum()) for img in images[:5]]
    assert statuses[0].suffix_name == f"{name}-local"
    # Errors arrive as the numbered exception, from the future.
    with pytest.raises(InfinibrainException) as err:
        cluster.get_container_handler_future("no-such-inference").result(10)
    assert err.value.code == 300
    cluster.unload_inference_future(name).result(30)


def test_retry_on_309_only_with_a_policy(fresh_manager, name):
    m = fresh_manager().start()
    plain = m.client()
    patient = m.client(retry=RetryPolicy(attempts=40, backoff=0.2, max_backoff=0.5))
    slow = echo_config(name, run_command="python slowstart.py")
    done = threading.Event()
    plain.load_inference_async(slow, "local", func=lambda *a: done.set())
    wait_for(lambda: _busy(plain, name), timeout=10)
    with pytest.raises(APIConflictException):
        plain.unload_inference(name)  # refused while the load runs: 309
    # The same call with a retry policy waits out the load, then unloads.
    assert patient.unload_inference(name) == []
    assert done.wait(10)
    plain.release()
    patient.release()


def _busy(c: AICluster, name: str) -> bool:
    try:
        c.get_container_handler(name)
        return True
    except InfinibrainException:
        return False


def test_inference_retry_is_off_by_default_and_only_for_requests_never_sent(fresh_manager, name):
    m = fresh_manager().start()
    plain = m.client()
    patient = m.client(retry=RetryPolicy(attempts=30, backoff=0.2, max_backoff=0.3, inference=True))
    handler = plain.load_inference(echo_config(name, send_timeout=300), "local")
    handler.stop_distribution()
    with pytest.raises(SendQueueTimeoutException):
        plain.infer(name, b"x")  # 306: nobody takes it
    threading.Timer(1.5, handler.start_distribution).start()
    started = time.monotonic()
    result, _ = patient.infer(name, b"xyz")  # 306, 306, ... then taken once distribution is on
    assert result["shape"] == [3] and time.monotonic() - started >= 1.0
    future = patient.infer_image_future(name, np.zeros((2, 2, 3), np.uint8))
    assert future.result(10)["shape"] == [2, 2, 3]
    plain.unload_inference(name)
    plain.release()
    patient.release()


def test_retry_policy_backoff_and_kinds():
    policy = RetryPolicy(attempts=4, backoff=0.1, max_backoff=0.3, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]
    assert policy.retries(309, 1, "unsafe") and not policy.retries(500, 1, "unsafe")
    assert policy.retries(500, 1, "safe") and not policy.retries(309, 4, "safe")
    assert not policy.retries(306, 1, "infer")  # inference: off unless asked
    assert RetryPolicy(inference=True).retries(306, 1, "infer") and not RetryPolicy(inference=True).retries(402, 1, "infer")
    jittery = RetryPolicy(backoff=1.0, jitter=0.5)
    assert all(0.5 <= jittery.delay(1) <= 1.5 for _ in range(50))
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_wait_for_manager(tmp_path):
    m = ManagerProcess(tmp_path / "m")
    starter = threading.Timer(1.0, m.start)
    starter.start()
    try:
        started = time.monotonic()
        c = wait_for_manager(port=m.port, timeout=30)
        assert time.monotonic() - started >= 0.9
        assert c.get_coprocessor_handler()
        c.release()
    finally:
        starter.join(30)  # its start() returns once the manager answers
        m.stop()
        m.cleanup()
    started = time.monotonic()
    with pytest.raises(SocketConnectionException) as err:
        wait_for_manager(port=m.port, timeout=1.5)
    assert "no manager within 1.5 s" in str(err.value) and time.monotonic() - started < 5


def test_public_api_passes_mypy():
    mypy = shutil.which("mypy") or str(Path(sys.executable).parent / "mypy")
    if not Path(mypy).exists():
        pytest.skip("mypy is not installed (pip install -e '.[test]' installs it)")
    out = subprocess.run([mypy, "--ignore-missing-imports", "--no-error-summary", str(ROOT / "infinibrain"), str(ROOT / "manager")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert (ROOT / "infinibrain" / "py.typed").exists()
