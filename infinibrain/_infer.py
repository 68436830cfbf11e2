"""AICluster's inference APIs (reference 2.9 and 2.12): one core, three forms.

``infer_image`` / ``infer`` wait for the answer (on the calling thread's own socket when it
has one), ``_async`` hands the outcome to a callback, ``_future`` to a
``concurrent.futures.Future``; all of them check and send a request the same way
(``_submit``). Beyond the reference, every form takes a keyword-only ``priority`` (an
int, default 0; higher is sent to a container first: docs/DECISIONS.md, "Routing").

``_Inference`` is a part of ``AICluster`` (infinibrain/inference.py), which gives it
``_client`` and ``_connected_client``. Runs on the caller's thread.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import _api
from . import protocol as P
from ._client import ClusterClient
from ._direct import DirectReply
from ._pending import Pending
from .errors import InfinibrainException, argument_error, make_error
from .types import InferenceResponse

def check_priority(priority: Any) -> int:
    if not P.valid_priority(priority):
        raise argument_error("priority", f"must be an integer from {-P.PRIORITY_LIMIT} to {P.PRIORITY_LIMIT - 1}, got {priority!r}")
    return priority


class _Inference:
    if TYPE_CHECKING:
        _client: ClusterClient

        def _connected_client(self) -> ClusterClient: ...

    def _call(self, inference_name: Any, data: Any, param: Any, image: bool, result_only: bool, priority: Any) -> Any:
        """A synchronous inference: send, and wait for the answer, which comes straight to
        this thread's own socket when it has one."""
        client = self._connected_client()
        direct = client.direct_reply()
        pending = self._submit(inference_name, data, param, image, None, priority, result_only=result_only, direct=direct)
        return client.wait_direct(pending, direct) if direct is not None else pending.wait()

    def _submit(self, inference_name: Any, data: Any, param: Any, image: bool, on_done: Callable | None, priority: Any,
                detached: bool = False, result_only: bool = False, direct: DirectReply | None = None) -> Pending:
        """Send one request. ``detached``: the call returns before the answer (``_async``,
        ``_future``), so a buffer the caller may change is copied before it is sent (the
        client does it: into shared memory, or a copy for ZeroMQ). ``result_only``: the
        pending call's future carries the result alone."""
        client = self._connected_client()
        name = _api.require_str(inference_name, "inference_name")
        payload, arr = _api.request_data(data, image)
        _api.check_size(payload, image, client.max_message_size)
        return client.infer(name, payload, arr, _api.parse_param(param), on_done, result_only, direct, detached,
                            check_priority(priority))

    def _infer_retrying(self, attempt: Callable[[], Any]) -> Any:
        try:
            return _api.with_retries(attempt, self._client.retry, "infer")
        except InfinibrainException as exc:
            # 403 reaches the infer callback too (chapter 8: "as exception" and "to callback").
            if exc.code == 403 and self._client.infer_callback is not None:
                self._client.deliver(self._client.infer_callback, exc.code, exc.message, None, getattr(exc, "response", None))
            raise

    def _infer_callback(self, func: Callable | None) -> Callable:
        callback = func or self._client.infer_callback
        if callback is None or not callable(callback):
            raise argument_error("func", "no callback given and no infer_callback set with set_callback")
        return callback

    def _send_async(self, inference_name: Any, data: Any, param: Any, image: bool, func: Callable | None,
                    lost_raises: bool, priority: Any) -> str:
        """An ``_async`` inference. Raised at call time, and passed to the callback too, as
        the reference's table has them: 403 (the manager says which inferences take no
        requests) and, with ``lost_raises``, 402 (the connection to the manager is lost);
        every other outcome goes to the callback only."""
        client = self._client
        error: InfinibrainException | None = None
        if lost_raises and client.lost:
            error = make_error(402, detail=f"the connection to the manager at {client.host}:{client.port} is lost")
        else:
            self._connected_client()
            if isinstance(inference_name, str) and inference_name in client.no_input:
                error = make_error(403, inference_name)
        callback = self._infer_callback(func)
        if error is not None:
            client.deliver(callback, error.code, error.message, None, None)
            raise error
        return self._submit(inference_name, data, param, image, callback, priority, detached=True).rid

    # ---- the reference's forms ----------------------------------------------------------------

    def infer_image(self, inference_name: str, image_data: np.ndarray, param: Any = {}, *,  # noqa: B006 - the reference's default
                    priority: int = 0) -> Any:
        """Run the inference on an image; returns what the container sent back.
        ``priority`` (not in the reference): higher is sent first among waiting requests."""
        return self._infer_retrying(lambda: self._call(inference_name, image_data, param, True, True, priority))

    def infer_image_async(self, inference_name: str, image_data: np.ndarray, param: Any = {},  # noqa: B006
                          func: Callable | None = None, *, priority: int = 0) -> str:
        """Run the inference on an image; ``func(code, message, result, response)`` or the
        infer callback gets the outcome. The image is copied unless it is read-only
        (``image.setflags(write=False)`` sends it without a copy: then do not change it
        until the callback ran). InvalidInferenceNameException (403) is raised at once
        (and passed to the callback)."""
        return self._send_async(inference_name, image_data, param, True, func, False, priority)

    def infer(self, inference_name: str, in_data: bytes, param: Any = {}, *,  # noqa: B006
              priority: int = 0) -> tuple[Any, InferenceResponse]:
        """Run the inference on bytes; returns (result, InferenceResponse)."""
        result, response = self._infer_retrying(lambda: self._call(inference_name, in_data, param, False, False, priority))
        return result, response

    def infer_async(self, inference_name: str, in_data: bytes, param: Any = {},  # noqa: B006
                    func: Callable | None = None, *, priority: int = 0) -> str:
        """Run the inference on bytes; the outcome goes to ``func`` or the infer callback.
        InvalidInferenceNameException (403) and ContainerDisconnectException (402, the
        connection to the manager is lost) are raised at once (and passed to the callback)."""
        return self._send_async(inference_name, in_data, param, False, func, True, priority)

    # ---- beyond the reference: futures -------------------------------------------------------------

    def infer_image_future(self, inference_name: str, image_data: np.ndarray, param: Any = {}, *,  # noqa: B006
                           priority: int = 0) -> "Future[Any]":
        """infer_image as a ``concurrent.futures.Future`` of the result (not in the reference;
        ``await asyncio.wrap_future(...)`` in asyncio code)."""
        self._connected_client()
        return _api.run_future(lambda: self._submit(inference_name, image_data, param, True, None, priority, detached=True,
                                                    result_only=True),
                               _api.same, self._client.retry, "infer")

    def infer_future(self, inference_name: str, in_data: bytes, param: Any = {}, *,  # noqa: B006
                     priority: int = 0) -> "Future[tuple[Any, InferenceResponse]]":
        """infer as a ``concurrent.futures.Future`` of (result, InferenceResponse)."""
        self._connected_client()
        return _api.run_future(lambda: self._submit(inference_name, in_data, param, False, None, priority, detached=True),
                               _api.same, self._client.retry, "infer")

    # ---- listed in the reference's error table, not supported ---------------------------------------

    def infer_voice(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported: NotImplementedException (900)."""
        raise make_error(900, detail="infer_voice")

    def infer_voice_async(self, *args: Any, **kwargs: Any) -> str:
        """Not supported: NotImplementedException (900)."""
        raise make_error(900, detail="infer_voice_async")

    def infer_text(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported: NotImplementedException (900)."""
        raise make_error(900, detail="infer_text")

    def infer_text_async(self, *args: Any, **kwargs: Any) -> str:
        """Not supported: NotImplementedException (900)."""
        raise make_error(900, detail="infer_text_async")
