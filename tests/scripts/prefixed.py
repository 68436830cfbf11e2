"""Test inference with two modules whose names share a prefix ("scale", "scale2"): each
Connector must take only its own module's requests."""
import threading

from infinibrain.containers import Connector


def serve(sub: str) -> None:
    conn = Connector(sub_name=sub)
    while True:
        data, param, response = conn.receive_request()
        conn.send_response({"module": sub}, response)


threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in ("scale", "scale2")]
for t in threads:
    t.start()
for t in threads:
    t.join()
