"""Test inference that takes a while to start (loading a big model, say)."""
import time

from infinibrain.containers import Connector

time.sleep(3)
conn = Connector()
while True:
    data, param, response = conn.receive_request()
    conn.send_response("slow ready", response)
