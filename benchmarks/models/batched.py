"""The batching benchmark's model: a fixed cost per call (a 600x600 matrix product, about
5 ms on one core) plus a small cost per image (a product over the stacked batch).

Takes batches when the inference has ``max_batch_size`` (INFINIBRAIN_MAX_BATCH_SIZE is
set), else one request at a time: the same model both ways.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core per replica, as on a board
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from infinibrain.containers import Connector  # noqa: E402

rng = np.random.default_rng(0)
LAYER = rng.standard_normal((600, 600)).astype(np.float32) / 600
HEAD = rng.standard_normal((4096, 16)).astype(np.float32) / 64


def model(images: list) -> list:
    fixed = float(np.tanh(LAYER @ LAYER)[0, 0])  # what every call costs, whatever its size
    x = np.stack([image.reshape(-1)[:4096] for image in images]).astype(np.float32) / 255
    scores = x @ HEAD
    return [{"score": float(row.max()) + fixed, "label": int(row.argmax())} for row in scores]


connector = Connector()
if os.environ.get("INFINIBRAIN_MAX_BATCH_SIZE"):
    while True:
        batch = connector.receive_request_image_batch()
        connector.send_response_batch(model([image for image, _, _ in batch]), [response for _, _, response in batch])
else:
    while True:
        image, param, response = connector.receive_request_image()
        connector.send_response(model([image])[0], response)
