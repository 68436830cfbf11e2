"""Test inference started by hand: the Connector gets all five arguments, nothing from the
environment. argv: sub_name host_ip pub_port sub_port."""
import os
import sys

import zmq

from infinibrain.containers import Connector

sub_name, host, pub_port, sub_port = sys.argv[1:5]
conn = Connector(zmq.Context.instance(), sub_name, host, pub_port, sub_port)
while True:
    data, param, response = conn.receive_request()
    conn.send_response({"pid": os.getpid(), "got": len(data), "sub": response.sub_inference_name}, response)
