"""The routing benchmark's model: waits ``param["ms"]`` milliseconds (default 10) without
using the CPU, as a model on an accelerator does, then answers the priority it was sent with."""
import time

from infinibrain.containers import Connector

connector = Connector()
while True:
    data, param, response = connector.receive_request()
    time.sleep(float(param.get("ms", 10)) / 1000)
    connector.send_response({"tag": param.get("tag", "")}, response)
