"""A Connector's calls to other inferences, as data: what a call sends and what its
answer becomes (the Connector does the sending and waiting; manager/calls.py the rest).

Pure: any thread.
"""
from __future__ import annotations

from typing import Any

from .. import protocol as P
from .._api import parse_param, request_data, require_str
from ..errors import argument_error, error_from_code
from ..types import InferenceResponse

DEFAULT_CALL_TIMEOUT = 60.0  # seconds a call waits for its answer unless told (the manager ends it by the parent's deadline)


def call_message(number: str, inference_name: Any, data: Any, param: Any, image: bool, sub: str,
                 parent: InferenceResponse | None) -> tuple[dict, Any]:
    """(header, data frame) of a call; 100 naming a bad argument."""
    name = require_str(inference_name, "inference_name")
    header: dict[str, Any] = {"rid": number, "inf": name, "param": parse_param(param), "sub": sub}
    data, arr = request_data(data, image)
    if arr is not None:
        header["arr"] = arr
    if parent is not None:
        if not isinstance(parent, InferenceResponse):
            raise argument_error("response", f"must be the InferenceResponse of the request being served, got {type(parent).__name__}")
        mkey = (parent.metadata_sys or {}).get("mkey")
        if mkey is not None:
            header["parent"] = mkey
        if (parent.metadata_sys or {}).get("tp"):
            header["tp"] = parent.metadata_sys["tp"]  # the call joins the trace of the request it serves
    return header, data


def call_outcome(inference_name: str, header: dict, frame: Any) -> tuple[Any, InferenceResponse]:
    """(result, InferenceResponse) of a call's answer, or its numbered error raised as the
    SDK raises it (the same exception classes)."""
    code = int(header.get("code") or 0)
    if code:
        raise error_from_code(code, header.get("msg") or "", header.get("detail") or "")
    try:
        result = P.unpack_value(frame) if frame is not None else None
    except P.ProtocolError as exc:
        raise error_from_code(999, "unknown error", f"the answer of {inference_name!r} could not be decoded: {exc}") from None
    given = header.get("resp")
    response = InferenceResponse.from_dict(given if isinstance(given, dict) else None)
    response.request_no, response.inference_name = str(header.get("rid") or ""), inference_name
    return result, response
