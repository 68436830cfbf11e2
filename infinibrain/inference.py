"""AICluster: the host application's view of the cluster (reference chapter 2).

The application's threads: each call checks its arguments there and hands off to the client core (_client.py).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from typing import Any, Callable


from . import _api
from . import protocol as P
from ._api import Call
from ._client import ClusterClient
from ._infer import _Inference
from .container import ContainerHandler
from .coprocessor import CoprocessorHandler
from .errors import ConnectionFailedException, InfinibrainException, SocketConnectionException, argument_error, make_error
from .retry import NO_RETRY, RetryPolicy
from .types import FILE_INFO_KEYS, ContainerConfig, ContainerStatus, CoprocessorImages, QueueInfo, _plain

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5570


class AICluster(_Inference):
    """Controls the whole cluster: registers inferences, runs them, inspects and manages.

    ``AICluster()`` connects to a manager started with the embedded default on this host
    (or to ``$INFINIBRAIN_MANAGER``, "host:port"); ``AICluster(host_ip, port)`` names
    another. The constructor proves both the inference and the management path before it
    returns: SocketConnectionException (110) when the manager cannot be reached within
    ``timeout`` seconds, ConnectionFailedException (111) when only one path works.
    """

    def __init__(self, host_ip: str | None = None, port: int | None = None, timeout: float = 5.0,
                 logger: logging.Logger | logging.LoggerAdapter | None = None, *, retry: RetryPolicy | None = None) -> None:
        env_host, env_port = _manager_from_env()
        host = host_ip or env_host or DEFAULT_HOST
        port = port if port is not None else (env_port or DEFAULT_PORT)
        if not isinstance(port, int) or not 0 < port < 65536 - P.PORT_COUNT:
            raise argument_error("port", f"must be a TCP port number, got {port!r}")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise argument_error("timeout", f"must be a positive number of seconds, got {timeout!r}")
        self._logger = logger or logging.getLogger("infinibrain.inference")
        self._client = ClusterClient(host, port, float(timeout), self._logger)
        self._client.retry = retry or NO_RETRY
        try:
            self._client.handshake()
        except BaseException:
            self._client.close()
            raise

    def __repr__(self) -> str:
        state = "connected" if self._client.connected else "disconnected"
        return f"AICluster({self._client.host}:{self._client.port}, {state})"

    def _connected_client(self) -> ClusterClient:
        self._client.check_connected()
        return self._client

    # Each API checks the connection first, then its arguments (``build``), as chapter 8 orders them.

    def _run(self, build: Callable[..., Call], *args: Any, **kwargs: Any) -> Any:
        client = self._connected_client()
        return _api.run(client, build(*args, **kwargs))

    def _run_async(self, func: Callable | None, build: Callable[..., Call], *args: Any, **kwargs: Any) -> str:
        client = self._connected_client()
        return _api.run_async(client, build(*args, **kwargs), func)

    def _future(self, build: Callable[..., Call], *args: Any, on_progress: Callable[[str, dict], None] | None = None,
                **kwargs: Any) -> Future:
        client = self._connected_client()
        return _api.future_of(client, build(*args, **kwargs), on_progress)

    # ---- beyond the reference: a context manager, futures ----------------------------------

    def __enter__(self) -> "AICluster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _handlers(self, rows: list) -> list[ContainerHandler]:
        return [ContainerHandler(self, **row) for row in rows]

    # ---- 2.1 callbacks, 2.3 release, 2.10/2.11 logger, 2.17 connection ---------------

    def set_callback(self, infer_callback: Callable | None = None, manage_callback: Callable | None = None) -> None:
        """Set the common callbacks: ``infer_callback(code, message, result, response)`` and
        ``manage_callback(code, message, cmd, result)``. They run on an SDK thread."""
        self._client.infer_callback = infer_callback
        self._client.manage_callback = manage_callback

    def set_progress_callback(self, progress_callback: Callable[[str, dict], None] | None) -> None:
        """Not in the reference: ``progress_callback(cmd, info)`` receives the progress of
        this AICluster's slow management calls (sync, ``_async`` or ``_future``), e.g. an
        image being sent and loaded: ``info`` = {"stage", "done", "total", "board"}. The
        reference's callbacks are still called once, with the outcome."""
        self._client.progress_callback = progress_callback

    def release(self) -> None:
        """Release the communication resources; pending calls end with 111."""
        self._client.close()

    def get_logger(self) -> logging.Logger | logging.LoggerAdapter:
        """The logger AICluster uses."""
        return self._logger

    def set_logger(self, logger: logging.Logger | logging.LoggerAdapter) -> None:
        """Use ``logger`` from now on."""
        if not isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
            raise argument_error("logger", "must be a logging.Logger (or a logging.LoggerAdapter)")
        self._logger = logger
        self._client.logger = logger

    def connect_aicluster(self) -> None:
        """Check the connection to the cluster; SocketConnectionException (110) if it fails."""
        if self._client._closed:
            raise make_error(110, detail="this AICluster was released")
        try:
            self._client.handshake()
        except InfinibrainException as exc:
            raise make_error(110, detail=exc.detail or exc.message) from None

    connect_aiclustor = connect_aicluster  # the spelling printed in the reference's chapter 2

    # ---- 2.2 load_inference --------------------------------------------------------------

    def _load(self, container_config: Any, coprocessor_name: Any) -> Call:
        single_config = not isinstance(container_config, (list, tuple))
        configs = [container_config] if single_config else list(container_config)
        if container_config is None or not configs or any(c is None for c in configs):
            raise argument_error("container_config")
        wire = []
        for c in configs:
            if isinstance(c, ContainerConfig):
                wire.append(c.to_dict())
            elif isinstance(c, (dict, str)):
                wire.append(_plain(c))
            else:
                raise argument_error("container_config", f"must be a ContainerConfig, got {type(c).__name__}")
        if isinstance(coprocessor_name, (list, tuple)):
            boards: Any = [_api.require_str(b, "coprocessor_name") for b in coprocessor_name]
            if not boards:
                raise argument_error("coprocessor_name")
        else:
            boards = _api.require_str(coprocessor_name, "coprocessor_name")
        single = single_config and isinstance(boards, str) and boards != "all"

        def convert(rows: list) -> Any:
            # The manager answers for exactly the boards named (in order): one config on one
            # named board is one ContainerHandler, anything else a list.
            handlers = self._handlers(rows)
            return handlers[0] if single else handlers

        return Call("load_inference", "load_inference", {"configs": wire, "boards": boards}, convert)

    def load_inference(self, container_config: Any, coprocessor_name: Any) -> Any:
        """Register inference container(s) on board(s) ("all" = every board) and start them.

        Returns the ContainerHandler (one config on one named board) or a list of them.
        """
        return self._run(self._load, container_config, coprocessor_name)

    def load_inference_async(self, container_config: Any, coprocessor_name: Any, func: Callable | None = None) -> str:
        """load_inference; the handlers go to ``func`` or the manage callback."""
        return self._run_async(func, self._load, container_config, coprocessor_name)

    # ---- 2.4 unload_inference ---------------------------------------------------------------

    def _unload(self, inference_name: str, coprocessor_name: str, delete_image: bool) -> Call:
        args = {
            "inference_name": _api.require_str(inference_name, "inference_name", allow_empty=True),
            "coprocessor_name": _api.require_str(coprocessor_name, "coprocessor_name", allow_empty=True),
            "delete_image": bool(delete_image),
        }
        return Call("unload_inference", "unload_inference", args, self._handlers)

    def unload_inference(self, inference_name: str = "", coprocessor_name: str = "", delete_image: bool = True) -> list[ContainerHandler]:
        """Delete the inference's containers ("" = every inference, every board).

        Returns the containers that remain afterwards.
        """
        return self._run(self._unload, inference_name, coprocessor_name, delete_image)

    def unload_inference_async(self, inference_name: str = "", coprocessor_name: str = "", delete_image: bool = True,
                               func: Callable | None = None) -> str:
        """unload_inference; the remaining containers go to ``func`` or the manage callback."""
        return self._run_async(func, self._unload, inference_name, coprocessor_name, delete_image)

    # ---- 2.5 - 2.8 queries -----------------------------------------------------------------------

    def _query(self, api: str, inference_name: str, convert: Callable) -> Call:
        name = _api.require_str(inference_name, "inference_name", allow_empty=True)
        return Call(api, api, {"inference_name": name}, convert, safe=True)

    def _coprocessors(self, rows: list) -> list[CoprocessorHandler]:
        return [CoprocessorHandler(self, r["name"], r["ip"]) for r in rows]

    def get_coprocessor_handler(self, inference_name: str = "") -> list[CoprocessorHandler]:
        """The boards the inference is registered on ("" = every board)."""
        return self._run(self._query, "get_coprocessor_handler", inference_name, self._coprocessors)

    def get_coprocessor_handler_async(self, inference_name: str = "", func: Callable | None = None) -> str:
        """get_coprocessor_handler, to ``func`` or the manage callback."""
        return self._run_async(func, self._query, "get_coprocessor_handler", inference_name, self._coprocessors)

    def get_coprocessor_images(self, inference_name: str = "") -> list[CoprocessorImages]:
        """The images of the boards the inference is on ("" = every board)."""
        return self._run(self._query, "get_coprocessor_images", inference_name, _images)

    def get_coprocessor_images_async(self, inference_name: str = "", func: Callable | None = None) -> str:
        """get_coprocessor_images, to ``func`` or the manage callback."""
        return self._run_async(func, self._query, "get_coprocessor_images", inference_name, _images)

    def get_container_handler(self, inference_name: str = "") -> list[ContainerHandler]:
        """The inference's containers ("" = every container)."""
        return self._run(self._query, "get_container_handler", inference_name, self._handlers)

    def get_container_handler_async(self, inference_name: str = "", func: Callable | None = None) -> str:
        """get_container_handler, to ``func`` or the manage callback."""
        return self._run_async(func, self._query, "get_container_handler", inference_name, self._handlers)

    def get_container_status(self, inference_name: str = "") -> list[ContainerStatus]:
        """Status and figures of the inference's containers ("" = every container)."""
        return self._run(self._query, "get_container_status", inference_name, _statuses)

    def get_container_status_async(self, inference_name: str = "", func: Callable | None = None) -> str:
        """get_container_status, to ``func`` or the manage callback."""
        return self._run_async(func, self._query, "get_container_status", inference_name, _statuses)

    # ---- 2.9 / 2.12 inference: infinibrain/_infer.py -------------------------------------------------

    # ---- 2.13 put_file -------------------------------------------------------------------------------

    def _put(self, inference_name: str, file_info: Any, bad_keys: bool = True) -> Call:
        """The put_file call; with ``bad_keys``, a key that is not one of FILE_INFO_KEYS is
        raised (101) here too (the ``_async`` form hands it to the callback instead)."""
        name = _api.require_str(inference_name, "inference_name")
        if file_info is None or (isinstance(file_info, dict) and not file_info):
            raise argument_error("file_info")
        if not isinstance(file_info, dict):
            raise argument_error("file_info", "must be a dict such as {'model': '/path/to/file'}")
        error = self._bad_key(file_info)
        if error is not None and bad_keys:
            raise error
        return Call("put_file", "put_file", {"inference_name": name, "file_info": dict(file_info)}, lambda _r: None)

    @staticmethod
    def _bad_key(file_info: dict) -> InfinibrainException | None:
        bad = [k for k in file_info if k not in FILE_INFO_KEYS]
        return make_error(101, bad[0], detail=f"file_info keys are {', '.join(FILE_INFO_KEYS)}") if bad else None

    def put_file(self, inference_name: str, file_info: dict) -> None:
        """Send files to the inference's containers.

        ``file_info``: ``{"script"|"model"|"file": path or [paths], "To": folder in the
        container (default: its working folder)}``. Files are replaced atomically.
        """
        return self._run(self._put, inference_name, file_info)

    def put_file_async(self, inference_name: str, file_info: dict, func: Callable | None = None) -> str:
        """put_file; the outcome goes to ``func`` or the manage callback (101 too)."""
        client = self._connected_client()
        call = self._put(inference_name, file_info, bad_keys=False)
        error = self._bad_key(file_info)
        if error is not None:
            return _api.report_async(client, "put_file", error, func)
        return _api.run_async(client, call, func)

    # ---- 2.14 / 2.15 queues ------------------------------------------------------------------------------

    def _queue(self, api: str, inference_name: str, request_no: Any, pid: Any, **extra: Any) -> Call:
        args = {
            "inference_name": _api.require_str(inference_name, "inference_name", allow_empty=True),
            "request_no": _api.require_int(int(request_no) if isinstance(request_no, str) and request_no.isdigit() else request_no, "request_no"),
            "pid": _api.require_int(pid, "pid"),
            **extra,
        }
        return Call(api, api, args, lambda rows: [QueueInfo.from_dict(r) for r in rows], safe=api == "get_queue_info")

    def get_queue_info(self, inference_name: str = "", request_no: int = 0, pid: int = 0) -> list[QueueInfo]:
        """Requests waiting in send-wait queues (0 / "" = all)."""
        return self._run(self._queue, "get_queue_info", inference_name, request_no, pid)

    def get_queue_info_async(self, inference_name: str = "", request_no: int = 0, pid: int = 0, func: Callable | None = None) -> str:
        """get_queue_info, to ``func`` or the manage callback."""
        return self._run_async(func, self._queue, "get_queue_info", inference_name, request_no, pid)

    def delete_queue(self, inference_name: str = "", request_no: int = 0, pid: int = 0, force_delete: bool = False) -> list[QueueInfo]:
        """Cancel waiting requests; returns the queues afterwards.

        Without ``force_delete`` only this process's requests are deleted, and naming
        another process's pid is PermissionException (308). A deleted request ends with 306.
        """
        return self._run(self._queue, "delete_queue", inference_name, request_no, pid, force_delete=bool(force_delete))

    def delete_queue_async(self, inference_name: str = "", request_no: int = 0, pid: int = 0, force_delete: bool = False,
                           func: Callable | None = None) -> str:
        """delete_queue, to ``func`` or the manage callback."""
        return self._run_async(func, self._queue, "delete_queue", inference_name, request_no, pid, force_delete=bool(force_delete))

    # ---- 2.16 reload_inference --------------------------------------------------------------------------

    def _reload(self, inference_name: str) -> Call:
        name = _api.require_str(inference_name, "inference_name")
        return Call("reload_inference", "reload_inference", {"inference_name": name}, self._handlers)

    def reload_inference(self, inference_name: str) -> list[ContainerHandler]:
        """Start the inference's containers again from its inference config file.

        Returns a list of ContainerHandler, one per board of the inference (always a list:
        an inference may be on several boards)."""
        return self._run(self._reload, inference_name)

    def reload_inference_async(self, inference_name: str, func: Callable | None = None) -> str:
        """reload_inference, to ``func`` or the manage callback."""
        return self._run_async(func, self._reload, inference_name)

    # ---- beyond the reference -------------------------------------------------------------------------------

    def _restart(self, inference_name: str, coprocessor_name: str, rolling: bool) -> Call:
        args = {"inference_name": _api.require_str(inference_name, "inference_name"),
                "board": _api.require_str(coprocessor_name, "coprocessor_name", allow_empty=True), "rolling": bool(rolling)}
        return Call("restart_inference", "restart_inference", args, self._handlers)

    def restart_inference(self, inference_name: str, coprocessor_name: str = "", rolling: bool = True) -> list[ContainerHandler]:
        """Not in the reference: restart the inference's containers, e.g. after put_file.

        ``rolling`` (the default): a new container on every board, started beside the old
        one, which serves until the new one is ready (so nothing is refused meanwhile);
        if a new one fails, the old ones keep serving and the error says so. One board
        (``coprocessor_name``) or ``rolling=False``: the containers are stopped and started
        again in place, every board at once. Returns the containers restarted.
        """
        return self._run(self._restart, inference_name, coprocessor_name, rolling)

    def restart_inference_async(self, inference_name: str, coprocessor_name: str = "", rolling: bool = True,
                                func: Callable | None = None) -> str:
        """restart_inference; the containers go to ``func`` or the manage callback."""
        return self._run_async(func, self._restart, inference_name, coprocessor_name, rolling)

    def restart_inference_future(self, inference_name: str, coprocessor_name: str = "", rolling: bool = True) -> Future:
        """restart_inference as a Future of the restarted ContainerHandlers."""
        return self._future(self._restart, inference_name, coprocessor_name, rolling)

    def remove_images(self, tags: list[str], coprocessor_name: str = "") -> list[dict]:
        """Not in the reference: remove old image tags from the boards ("" = every board).
        A tag a registered inference uses there is kept. Returns one row per board and tag:
        {"board", "tag", "removed", "why"}."""
        def build() -> Call:
            if not isinstance(tags, (list, tuple)) or not tags:
                raise argument_error("tags", "a list of image tags")
            return Call("remove_images", "remove_images",
                        {"tags": [_api.require_str(t, "tags") for t in tags],
                         "board": _api.require_str(coprocessor_name, "coprocessor_name", allow_empty=True)})

        return self._run(build)

    def stats(self) -> dict:
        """Not in the reference: the manager's own figures (requests queued and in flight,
        dropped frames by port, refused keys, clients, loop errors, its memory)."""
        return self._run(lambda: Call("stats", "stats", {}, safe=True))

    def get_board_telemetry(self) -> dict:
        """Not in the reference: what each board is doing, as its sampler last said
        (``{"boards": {name: {...}}, "energy": [...]}``): CPU per core and in all (0..1),
        memory (bytes), load, temperatures (°C); on a Jetson GPU and EMC load (0..1) and
        each power rail (W); ``state`` "ok", or "silent" (no figures) with ``why``. ``energy``
        lists the joules per request of each inference on a board that reports its power
        (docs/OPERATIONS.md, "Boards")."""
        return self._run(lambda: Call("boards", "boards", {}, safe=True))

    def get_container_logs(self, suffix_name: str, coprocessor_name: str, lines: int = 100) -> str:
        """The last ``lines`` lines a container wrote (not in the reference)."""
        return self._run(lambda: Call("logs", "logs", {"suffix_name": suffix_name, "board": coprocessor_name,
                                                       "lines": _api.require_int(lines, "lines")}, safe=True))


    # ---- futures: the management APIs as concurrent.futures.Future (not in the reference) ----------
    # Each is built from the same Call as its sync and _async twins.

    def load_inference_future(self, container_config: Any, coprocessor_name: Any,
                              on_progress: Callable[[str, dict], None] | None = None) -> Future:
        """load_inference as a Future of its ContainerHandler(s); ``on_progress(cmd, info)``
        gets this load's progress events."""
        return self._future(self._load, container_config, coprocessor_name, on_progress=on_progress)

    def unload_inference_future(self, inference_name: str = "", coprocessor_name: str = "", delete_image: bool = True) -> Future:
        """unload_inference as a Future of the remaining ContainerHandlers."""
        return self._future(self._unload, inference_name, coprocessor_name, delete_image)

    def get_coprocessor_handler_future(self, inference_name: str = "") -> Future:
        return self._future(self._query, "get_coprocessor_handler", inference_name, self._coprocessors)

    def get_coprocessor_images_future(self, inference_name: str = "") -> Future:
        return self._future(self._query, "get_coprocessor_images", inference_name, _images)

    def get_container_handler_future(self, inference_name: str = "") -> Future:
        return self._future(self._query, "get_container_handler", inference_name, self._handlers)

    def get_container_status_future(self, inference_name: str = "") -> Future:
        return self._future(self._query, "get_container_status", inference_name, _statuses)

    def put_file_future(self, inference_name: str, file_info: dict) -> Future:
        return self._future(self._put, inference_name, file_info)

    def get_queue_info_future(self, inference_name: str = "", request_no: int = 0, pid: int = 0) -> Future:
        return self._future(self._queue, "get_queue_info", inference_name, request_no, pid)

    def delete_queue_future(self, inference_name: str = "", request_no: int = 0, pid: int = 0, force_delete: bool = False) -> Future:
        return self._future(self._queue, "delete_queue", inference_name, request_no, pid, force_delete=bool(force_delete))

    def reload_inference_future(self, inference_name: str) -> Future:
        return self._future(self._reload, inference_name)


def wait_for_manager(host_ip: str | None = None, port: int | None = None, timeout: float = 30.0, **kwargs: Any) -> AICluster:
    """An AICluster connected to the manager, waiting up to ``timeout`` seconds for it to
    come up (a daemon starting, a board booting). SocketConnectionException (110) after
    that, with the last reason. ``kwargs`` go to AICluster (``logger``, ``retry``)."""
    deadline = time.monotonic() + timeout
    pause = 0.1
    while True:
        left = deadline - time.monotonic()
        try:
            return AICluster(host_ip, port, timeout=max(min(left, 2.0), 0.1), **kwargs)
        except (SocketConnectionException, ConnectionFailedException) as exc:
            if time.monotonic() + pause >= deadline:
                raise make_error(110, detail=f"no manager within {timeout:g} s ({exc.text})") from None
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


def _images(rows: list) -> list[CoprocessorImages]:
    return [CoprocessorImages.from_dict(r) for r in rows]


def _statuses(rows: list) -> list[ContainerStatus]:
    return [ContainerStatus.from_dict(r) for r in rows]


def _manager_from_env() -> tuple[str | None, int | None]:
    value = os.environ.get("INFINIBRAIN_MANAGER", "")
    if not value:
        return None, None
    host, _, port = value.rpartition(":")
    try:
        return host or None, int(port)
    except ValueError:
        raise argument_error("INFINIBRAIN_MANAGER", f"must be host:port, got {value!r}") from None


__all__ = ["AICluster"]
