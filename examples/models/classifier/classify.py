"""Inference script run inside the container: classify each image's dominant colour."""
import os

import numpy as np

from infinibrain.containers import Connector, info, log_setting
from model import predict

log_setting("classifier")
weights = np.load(os.environ.get("CLASSIFIER_WEIGHTS", "weights.npz"))["W"]
connector = Connector()
info(f"classifier ready ({weights.shape[0]} features, {weights.shape[1]} classes)", code=0)

while True:
    image, param, response = connector.receive_request_image()
    label, scores = predict(weights, image)
    connector.send_response({"label": label, "scores": scores}, response)
