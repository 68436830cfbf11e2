"""Test inference: says which user it runs as and what reading a file gave it.

param: {"read": path}: the answer's "read" is the file's first 40 bytes, or the error.
"""
import os

from infinibrain.containers import Connector

conn = Connector()
while True:
    data, param, response = conn.receive_request()
    outcome = None
    if param.get("read"):
        try:
            with open(param["read"], "rb") as fh:
                outcome = fh.read(40).decode(errors="replace")
        except OSError as exc:
            outcome = f"{type(exc).__name__}: {exc.strerror}"
    conn.send_response({"uid": os.getuid(), "read": outcome}, response)
