"""Test inference with input=None, output='Main': produces results on its own (a sensor)."""
import time

from infinibrain import InferenceResponse
from infinibrain.containers import Connector

conn = Connector()
n = 0
while True:
    n += 1
    conn.send_response({"tick": n}, InferenceResponse())
    time.sleep(0.05)
