"""One core for every management API, two thin facades.

Each reference API builds a ``Call`` once (wire command, arguments, how to turn the
manager's answer into the reference's return type). ``run`` is the synchronous form: it
waits and returns or raises. ``run_async`` is the ``_async`` form: it returns the request
number at once and hands ``(code, message, cmd, result)`` to the callback thread.
"""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import protocol as P
from .errors import InfinibrainException, argument_error, make_error
from .retry import RetryPolicy

if TYPE_CHECKING:
    from ._client import ClusterClient
    from ._pending import Pending


def same(value: Any) -> Any:
    """The answer as it is (a Call's default conversion)."""
    return value


@dataclass
class Call:
    name: str  # the API's name; what manage_callback receives as ``cmd``
    cmd: str  # the manager's command
    args: dict
    convert: Callable[[Any], Any] = same
    safe: bool = False  # a query or a switch: repeating it changes nothing (retry.py)


def run(client: "ClusterClient", call: Call) -> Any:
    """The synchronous form: wait, return or raise (retrying as the client's policy allows)."""
    return call.convert(with_retries(lambda: client.command(call.cmd, call.args).wait(), client.retry, _kind(call)))


def _kind(call: Call) -> str:
    return "safe" if call.safe else "unsafe"


def with_retries(attempt: Callable[[], Any], retry: RetryPolicy, kind: str) -> Any:
    n = 1
    while True:
        try:
            return attempt()
        except InfinibrainException as exc:
            if not retry.retries(exc.code, n, kind):
                raise
            time.sleep(retry.pause(n, exc))
            n += 1


def future_of(client: "ClusterClient", call: Call, on_progress: Callable[[str, dict], None] | None = None) -> concurrent.futures.Future:
    """``run_future`` of a management call (``on_progress(cmd, info)``: its progress events)."""
    return run_future(lambda: client.command(call.cmd, call.args, on_progress=on_progress), call.convert, client.retry, _kind(call))


def run_future(send: Callable[[], "Pending"], convert: Callable[[Any], Any], retry: RetryPolicy, kind: str) -> concurrent.futures.Future:
    """The ``_future`` form: a ``concurrent.futures.Future`` of the converted answer, on the
    same pending-call core as the other forms (``asyncio.wrap_future`` makes it awaitable)."""
    if convert is same and not retry.may_retry(kind):  # the pending call's own future is the answer
        try:
            future = send().future
            assert future is not None, "a _future call waits on its pending call's future"
            return future
        except InfinibrainException as exc:
            failed: concurrent.futures.Future = concurrent.futures.Future()
            failed.set_exception(exc)
            return failed
    outer: concurrent.futures.Future = concurrent.futures.Future()

    def attempt(n: int) -> None:
        try:
            pending = send()
        except InfinibrainException as exc:
            return finish(n, exc, None)
        assert pending.future is not None, "a _future call waits on its pending call's future"
        pending.future.add_done_callback(lambda f: finish(n, f.exception(), f))

    def finish(n: int, exc: BaseException | None, done: concurrent.futures.Future | None) -> None:
        if isinstance(exc, InfinibrainException) and retry.retries(exc.code, n, kind):
            timer = threading.Timer(retry.pause(n, exc), attempt, (n + 1,))
            timer.daemon = True
            timer.start()
        elif exc is not None:
            outer.set_exception(exc)
        else:
            try:
                outer.set_result(convert(done.result()))  # type: ignore[union-attr]
            except Exception as error:  # a conversion bug must still end the future
                outer.set_exception(make_error(999, detail=f"{type(error).__name__}: {error}"))

    attempt(1)
    return outer


def run_async(client: "ClusterClient", call: Call, func: Callable | None) -> str:
    callback = manage_callback_for(client, func)

    def done(code: int, message: str, result: Any, _response: Any) -> None:
        callback(code, message, call.name, call.convert(result) if code == 0 else None)

    return client.command(call.cmd, call.args, on_done=done).rid


def attached_client(cluster: Any, what: str) -> "ClusterClient":
    """The connected client of the AICluster a handler came from (111 if none)."""
    if cluster is None:
        from .errors import make_error

        raise make_error(111, detail=f"this {what} is not attached to an AICluster")
    return cluster._connected_client()


def manage_callback_for(client: "ClusterClient", func: Callable | None) -> Callable:
    callback = func or client.manage_callback
    if callback is None:
        raise argument_error("func", "no callback given and no manage_callback set with set_callback")
    if not callable(callback):
        raise argument_error("func", "the callback is not callable")
    return callback


def report_async(client: "ClusterClient", name: str, error: InfinibrainException, func: Callable | None) -> str:
    """Hand an error found by the SDK itself to the callback, as the reference wants for 101."""
    from ._pending import next_request_no

    callback = manage_callback_for(client, func)
    client.deliver(callback, error.code, error.message, name, None)
    return next_request_no()


def require_str(value: Any, name: str, allow_empty: bool = False) -> str:
    if value is None or not isinstance(value, str) or (not value and not allow_empty):
        raise argument_error(name, "" if value in (None, "") else f"must be a string, got {type(value).__name__}")
    return value


def require_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise argument_error(name, f"must be a non-negative integer, got {value!r}")
    return value


def parse_param(param: Any) -> dict:
    """``param`` as the reference gives it (a JSON string) or as a dict."""
    if param is None or param == "":
        return {}
    if isinstance(param, (str, bytes)):
        try:
            param = json.loads(param)
        except ValueError as exc:
            raise argument_error("param", f"not a JSON string: {exc}") from None
    if not isinstance(param, dict):
        raise argument_error("param", "must be a JSON object (a dict)")
    return param


def request_data(data: Any, image: bool) -> tuple[Any, dict | None]:
    """(payload, array description or None) of an inference's data, as infer_image (a
    numpy array of numbers) and infer (bytes) take it; 100 naming the argument."""
    what = "image_data" if image else "in_data"
    if data is None:
        raise argument_error(what)
    if not image:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise argument_error(what, f"must be bytes, got {type(data).__name__}")
        return data, None
    if not isinstance(data, np.ndarray):
        raise argument_error(what, f"must be a numpy.ndarray, got {type(data).__name__}")
    if data.dtype.hasobject:
        raise argument_error(what, "an array of Python objects cannot be sent")
    array = np.ascontiguousarray(data)
    return array, P.array_meta(array)


def check_size(payload: Any, image: bool, limit: int) -> None:
    """100 when ``payload`` is more than the manager's max_message_size."""
    size = memoryview(payload).nbytes
    if size > limit:
        raise argument_error("image_data" if image else "in_data",
                             f"it is {size} bytes, more than the manager's max_message_size of {limit}")

