"""One core for every management API, two thin facades.

Each reference API builds a ``Call`` once (wire command, arguments, how to turn the
manager's answer into the reference's return type). ``run`` is the synchronous form: it
waits and returns or raises. ``run_async`` is the ``_async`` form: it returns the request
number at once and hands ``(code, message, cmd, result)`` to the callback thread.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .errors import InfinibrainException, argument_error

if TYPE_CHECKING:
    from ._client import ClusterClient


def _same(value: Any) -> Any:
    return value


@dataclass
class Call:
    name: str  # the API's name; what manage_callback receives as ``cmd``
    cmd: str  # the manager's command
    args: dict
    convert: Callable[[Any], Any] = _same


def run(client: "ClusterClient", call: Call) -> Any:
    return call.convert(client.command(call.cmd, call.args).wait())


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
    from ._client import next_request_no

    callback = manage_callback_for(client, func)
    client.deliver(callback, error.code, error.message, name, None)
    return next_request_no()


def one_or_list(items: list) -> Any:
    """The reference returns "the structure" where one is meant; several come as a list."""
    return items[0] if len(items) == 1 else items


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
