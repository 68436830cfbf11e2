"""Test inference that says which version of itself answers: VERSION (this file's own
text) and version.txt (a file read once at start, e.g. one put_file replaced).

param: {"sleep": seconds} waits first.
"""
import os
import time
from pathlib import Path

from infinibrain.containers import Connector

VERSION = "v1"
FILE = Path("version.txt").read_text().strip() if Path("version.txt").exists() else ""

conn = Connector()
while True:
    data, param, response = conn.receive_request()
    if param.get("sleep"):
        time.sleep(float(param["sleep"]))
    conn.send_response({"version": VERSION, "file": FILE, "pid": os.getpid(),
                        "board": os.environ.get("INFINIBRAIN_BOARD")}, response)
