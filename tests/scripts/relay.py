"""Test inference that calls other inferences (Connector.infer / infer_image).

param {"next": [name, ...]}: call the first with the rest (and the same data); none left:
answer {"via": [this inference], "data": the text}. {"image": true}: the call is an
infer_image of the data's bytes as a uint8 array. An error of the inner call is passed on
as the answer (its code kept). Answers {"via": [this inference, ...], "inner": ...}.
"""
import os

import numpy as np

from infinibrain.containers import Connector
from infinibrain.errors import InfinibrainException

me = os.environ["INFINIBRAIN_INFERENCE"]
conn = Connector()
while True:
    data, param, response = conn.receive_request()
    nxt = list(param.get("next") or [])
    if not nxt:
        conn.send_response({"via": [me], "data": bytes(data).decode()}, response)
        continue
    inner_param = dict(param, next=nxt[1:])
    try:
        if param.get("image"):
            inner = conn.infer_image(nxt[0], np.frombuffer(bytes(data), np.uint8), inner_param)
            conn.send_response({"via": [me], "inner": inner}, response)
        else:
            inner, inner_response = conn.infer(nxt[0], data, inner_param)
            conn.send_response({"via": [me, *inner.get("via", [])], "inner": inner,
                                "inner_board": inner_response.metadata_sys.get("board")}, response)
    except InfinibrainException as exc:
        conn.send_response(exc, response)
