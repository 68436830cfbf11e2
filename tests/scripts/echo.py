"""Test inference: echoes what it receives, with knobs in param.

param: {"sleep": seconds} waits first; {"crash": true} exits at once (mid-request);
{"bad_result": true} returns something that cannot be encoded; {"read": path} adds the
text of that file (as the container sees it) to the answer; {"big": n} adds n bytes of text; {"arrays": true} answers with numpy arrays (the image's
rows as float32, its mean as a numpy scalar).
Every answer says which process and module served it, and how many requests it was
serving at the same time (to check max_send_num).
"""
import os
import platform
import time

import numpy as np

from infinibrain.containers import Connector, info, log_setting

log_setting("echo")
sub = os.environ.get("ECHO_SUB") or None
conn = Connector(sub_name=sub)
info(f"echo ready as {conn.sub_name}", code=0)
while True:
    image, param, response = conn.receive_request_image()
    if param.get("crash"):
        os._exit(3)
    if param.get("sleep"):
        time.sleep(float(param["sleep"]))
    if param.get("arrays"):
        rows = image.reshape(image.shape[0], -1).astype(np.float32)
        conn.send_response({"rows": rows, "mean": rows.mean(), "strided": rows[:, ::2], "plain": [1, "a"]}, response)
        continue
    if param.get("bad_result"):
        conn.send_response(object(), response)
        continue
    conn.send_response(
        {
            "pid": os.getpid(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "sub": conn.sub_name,
            "shape": list(image.shape),
            "dtype": str(image.dtype),
            "sum": int(image.astype(np.int64).sum()) if image.size < 10_000_000 else -1,
            "param": param,
            "request_no": response.request_no,
            "board": os.environ.get("INFINIBRAIN_BOARD"),
            "cwd_files": sorted(os.listdir(".")),
            "cwd": os.getcwd(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("INFINIBRAIN_", "ECHO_"))},
            "read": open(param["read"]).read() if param.get("read") else None,
            "big": len("x" * int(param.get("big") or 0)),
            "padding": "x" * int(param.get("big") or 0),
        },
        response,
    )
