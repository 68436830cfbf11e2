"""The calls waiting for their answers, and the InferenceResponse made from an answer.

A ``Pending`` is made by the calling thread and ended exactly once by whichever thread
sees its answer, its deadline or the loss of the manager first: ``Waiting.take`` (a
``dict.pop``, atomic) decides which. ``Waiting`` is shared by the calling threads, the I/O
thread and the threads that read their own answers.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from . import protocol as P
from . import shm
from .errors import error_from_code, format_message, make_error
from .types import InferenceResponse

if TYPE_CHECKING:
    from ._callbacks import CallbackThread
    from ._outbox import Outbox

ACK_TIMEOUT = 5.0  # a manager that is alive acknowledges within milliseconds
COMMAND_TIMEOUT = 3600.0  # bound on a management command once acknowledged
ANSWER_GRACE = 2.0  # beyond the deadline the manager announced, before we give up ourselves

_request_numbers = itertools.count(1)


def next_request_no() -> str:
    """Request acceptance numbers: unique within this process (together with the pid, cluster-wide)."""
    return str(next(_request_numbers))


Callback = Callable[[int, str, Any, Any], None]


class Pending:
    """One call waiting for its answer: a request number, what to do with the answer, and
    (for the sync and ``_future`` forms) the future that carries it."""

    __slots__ = ("rid", "kind", "deadline", "future", "on_done", "on_progress", "cmd", "acked", "inference", "tid", "param",
                 "result_only", "segment", "unacked")

    def __init__(self, rid: str, kind: str, deadline: float, *, on_done: Callback | None = None,
                 on_progress: Callable[[str, dict], None] | None = None, cmd: str = "", inference: str = "", tid: int = 0,
                 param: dict | None = None, result_only: bool = False) -> None:
        self.rid = rid
        self.kind = kind  # "infer" or "cmd"
        self.deadline = deadline
        # An ``_async`` call has its callback only; every other form waits on a future.
        self.future: concurrent.futures.Future | None = concurrent.futures.Future() if on_done is None else None
        self.on_done = on_done  # (code, message, result, response)
        self.on_progress = on_progress  # (cmd, info): progress events of a slow command
        self.cmd = cmd
        self.acked = False
        self.inference = inference
        self.tid = tid
        self.param = param  # what was sent as additional information (InferenceResponse.metadata)
        # The future's value is the result alone (infer_image, infer_image_future), not
        # (result, InferenceResponse): the response is then never built.
        self.result_only = result_only
        self.segment: shm.Segment | None = None  # the shared memory its payload is in, until it ends
        # A manager group's request, until a manager accepts it: (header, frames) to send again
        # to the next leader if the one it went to is lost before acknowledging it.
        self.unacked: tuple[dict, Any] | None = None

    def wait(self) -> Any:
        """The answer, or its numbered exception (bounded even if the I/O thread died)."""
        assert self.future is not None, "an _async call has no future to wait on"
        bound = None if self.deadline == float("inf") else max(self.deadline - time.monotonic(), 0) + COMMAND_TIMEOUT
        try:
            return self.future.result(timeout=bound)
        except concurrent.futures.TimeoutError:
            raise make_error(401, detail=f"no answer to request {self.rid}") from None


def response_of(p: Pending, pid: int, data: Any) -> InferenceResponse:
    """The InferenceResponse of an answer: what only the manager knows (where it ran, the
    module, the time stamps) from ``data``, the rest from the request itself."""
    data = data if isinstance(data, dict) else {}
    given = data.get("time_stamp")
    stamps = list(given) if isinstance(given, list) else []  # the decoder's fresh lists: ours to keep
    stamps.append(["client_receive", P.now()])
    try:
        elapsed = [[f"{a[0]}->{b[0]}", b[1] - a[1]] for a, b in zip(stamps, stamps[1:])]
        elapsed.append(["total", stamps[-1][1] - stamps[0][1]])
    except (TypeError, IndexError, KeyError):  # stamps not [stage, seconds]: the answer still ends its call
        elapsed = []
    return InferenceResponse(pid=pid, tid=p.tid, request_no=p.rid, inference_name=p.inference,
                             metadata=p.param if p.param is not None else {}, metadata_sys=data.get("metadata_sys") or {},
                             sub_inference_name=data.get("sub_inference_name") or "", time_stamp=stamps,
                             elapsed_time=elapsed)


def bare_response(p: Pending, pid: int) -> InferenceResponse | None:
    """The InferenceResponse of an inference that ended without the manager's answer."""
    if p.kind != "infer":
        return None
    return InferenceResponse(pid=pid, tid=p.tid, request_no=p.rid, inference_name=p.inference)


class Waiting:
    """The calls of one client waiting for their answers, by request number."""

    def __init__(self, pid: int, outbox: "Outbox", callbacks: "CallbackThread", logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.pid = pid
        self.outbox = outbox
        self.callbacks = callbacks
        self.logger = logger
        self._calls: dict[str, Pending] = {}

    def add(self, p: Pending) -> None:
        self._calls[p.rid] = p

    def get(self, rid: Any) -> Pending | None:
        return self._calls.get(str(rid))

    def take(self, rid: Any) -> Pending | None:
        """The call ``rid``, now the caller's alone to end (None: another thread ended it)."""
        return self._calls.pop(str(rid), None)

    def acked(self, rid: Any, header: dict) -> None:
        """The manager accepted call ``rid``; its answer comes by the ``timeout`` it names."""
        p = self.get(rid)
        if p is not None and not p.acked:
            p.acked = True
            p.unacked = None
            timeout = header.get("timeout")
            if p.kind == "infer" and timeout is None and "timeout" in header:
                p.deadline = float("inf")  # no answer limit: the manager's liveness still ends it
            else:
                p.deadline = time.monotonic() + (float(timeout) + ANSWER_GRACE if timeout else COMMAND_TIMEOUT)

    def finish(self, p: Pending, code: int, message: str, result: Any = None, response: Any = None, detail: str = "") -> None:
        """End ``p``: its future, or its callback (which gets the reference's message only;
        a 305's ``retry_after`` is in its response's ``metadata_sys``, and on the exception)."""
        self.outbox.release(p)
        future = p.future
        if future is not None:
            if code:
                exc = error_from_code(code, message, detail)
                exc.response = response  # type: ignore[attr-defined]
                if response is not None and "retry_after" in response.metadata_sys:
                    exc.retry_after = response.metadata_sys["retry_after"]  # type: ignore[attr-defined]
                future.set_exception(exc)
            elif p.kind == "cmd" or p.result_only:
                future.set_result(result)
            else:
                future.set_result((result, response))
            return
        if code and detail:
            # A callback gets the reference's message only: the detail is in the log.
            self.logger.debug("request %s ended with [%d] %s: %s", p.rid, code, message, detail)
        if p.on_done is not None:
            self.callbacks.deliver(p.on_done, code, message, result if code == 0 else None, response)

    def fail(self, p: Pending, code: int, why: str) -> None:
        self.finish(p, code, format_message(code), response=bare_response(p, self.pid), detail=why)

    def fail_all(self, infer_code: int, why: str, keep_unacked_until: float | None = None) -> None:
        """End every call with ``infer_code`` (a command with 111); with ``keep_unacked_until``,
        a group's requests no manager accepted yet wait until then for the next leader."""
        for rid in list(self._calls):
            p = self._calls.get(rid)
            if p is not None and keep_unacked_until is not None and p.unacked is not None:
                p.deadline = max(p.deadline, keep_unacked_until)
                continue
            p = self.take(rid)
            if p is not None:
                self.fail(p, infer_code if p.kind == "infer" else 111, why)

    def unacknowledged(self) -> list[Pending]:
        """A group's requests waiting to be sent again to the next leader, in request order."""
        return [p for p in list(self._calls.values()) if p.unacked is not None]

    def expire(self, now: float) -> None:
        """End the calls whose deadline passed: not acknowledged (402/111), or not answered
        in the time the manager announced (401/111)."""
        for p in list(self._calls.values()):
            if p.deadline <= now and self.take(p.rid) is not None:
                if not p.acked:
                    self.fail(p, 402 if p.kind == "infer" else 111, f"the manager did not acknowledge request {p.rid}")
                elif p.kind == "infer":
                    self.fail(p, 401, f"no answer to request {p.rid} in time")
                else:
                    self.fail(p, 111, f"no reply to command {p.rid}")
