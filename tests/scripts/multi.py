"""Test inference with two modules in one container: one Connector (thread) per module."""
import threading

from infinibrain.containers import Connector


def serve(sub: str, factor: int) -> None:
    conn = Connector(sub_name=sub)
    while True:
        data, param, response = conn.receive_request()
        conn.send_response({"module": sub, "value": len(data) * factor}, response)


threads = [threading.Thread(target=serve, args=(s, f), daemon=True) for s, f in (("double", 2), ("triple", 3))]
for t in threads:
    t.start()
for t in threads:
    t.join()
