"""Test inference that takes its requests in batches (dynamic batching).

Each answer says how big its batch was and where in it the request stood. param:
{"n": any} is echoed; {"fail": true} makes that request's result an error (the others of
its batch still succeed); {"sleep": seconds} waits once per batch; {"crash": true} exits
at once, with the whole batch unanswered.
"""
import os
import time

from infinibrain.containers import Connector

conn = Connector()
while True:
    batch = conn.receive_request_image_batch()
    params = [param for _, param, _ in batch]
    if any(p.get("crash") for p in params):
        os._exit(3)
    time.sleep(max(float(p.get("sleep") or 0) for p in params))
    results = []
    for index, (image, param, response) in enumerate(batch):
        if param.get("fail"):
            results.append(ValueError(f"request {param.get('n')} asked to fail"))
        else:
            results.append({"n": param.get("n"), "batch": len(batch), "index": index, "sum": int(image.sum()),
                            "rid": response.request_no})
    conn.send_response_batch(results, [response for _, _, response in batch])
