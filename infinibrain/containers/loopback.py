"""The ``Loop`` container: answers every request with a description of what it received.

Run by the manager for ``implementation_type="Loop"``; it checks a board and the whole
request path, and measures what the cluster itself costs (it does no work of its own).

The Loop container process's main thread.
"""
from __future__ import annotations

import sys

from .connector import Connector


def describe(data_len: int, response) -> dict:
    arr = response.metadata_sys.get("arr") or {}
    return {
        "bytes": data_len,
        "shape": arr.get("shape"),
        "dtype": arr.get("dtype"),
        "param": response.metadata,
        "sub_inference_name": response.sub_inference_name,
    }


def main() -> int:
    connector = Connector()
    while True:
        header, frame = connector._next(0)  # the frame itself: no copy of the payload
        response = connector._response(header)
        connector.send_response(describe(len(frame), response), response)


if __name__ == "__main__":
    sys.exit(main())
