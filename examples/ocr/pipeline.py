"""The OCR pipeline: a small script that calls two models served from their files.

Receives an RGB image, asks the detector ("ocr-det") for text lines, crops each and asks
the recognizer ("ocr-rec"), then answers {"lines": [{"box", "text", "score"}, ...]}. The
calls go through the manager (Connector.infer_image): each has the priority of the request
it serves and must end by its deadline; an error of either model ends the request with
that model's own numbered error.
"""
import os

from infinibrain.containers import Connector
from infinibrain.errors import InfinibrainException

DET = os.environ.get("OCR_DET", "ocr-det")
REC = os.environ.get("OCR_REC", "ocr-rec")

conn = Connector()
while True:
    image, param, response = conn.receive_request_image()
    try:
        found = conn.infer_image(DET, image, response=response)
        lines = []
        for box, score in zip(found["boxes"], found["scores"]):
            x0, y0, x1, y1 = box
            read = conn.infer_image(REC, image[y0:y1, x0:x1], response=response)
            lines.append({"box": box, "text": read["text"], "score": read["score"], "det_score": score})
        conn.send_response({"lines": lines}, response)
    except InfinibrainException as exc:
        conn.send_response(exc, response)
