"""Test inference with output=None: takes requests and writes them to a file, answers nothing."""
from infinibrain.containers import Connector

conn = Connector()
while True:
    data, param, response = conn.receive_request()
    with open("received.txt", "a") as fh:
        fh.write(f"{response.request_no} {len(data)}\n")
    conn.send_response("ignored", response)
