"""The scaling benchmark's model: about 5 ms of CPU per request (a busy loop measured in
the process's own CPU time, so it costs the same on any machine), then the image's mean."""
import time

from infinibrain.containers import Connector

COST = 0.005

connector = Connector()
while True:
    image, param, response = connector.receive_request_image()
    until = time.process_time() + COST
    while time.process_time() < until:
        pass
    connector.send_response({"mean": float(image.mean())}, response)
