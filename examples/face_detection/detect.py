"""Face detection with OpenCV's Haar cascade (it ships inside the opencv wheel).

A request is an encoded picture (PNG or JPEG bytes, ``infer``) or a decoded one (an
``infer_image`` array, RGB or grey); the answer is the faces found, as boxes
``{"x", "y", "w", "h"}`` in pixels of that picture.
"""
import cv2
import numpy as np

from infinibrain.containers import Connector, info, log_setting

log_setting("face-detector")
cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
if cascade.empty():
    raise SystemExit("the Haar cascade could not be loaded")
connector = Connector()
info(f"face detector ready (OpenCV {cv2.__version__})")
while True:
    data, param, response = connector.receive_request()
    meta = response.metadata_sys.get("arr")
    if meta:  # an array: infer_image
        picture = np.frombuffer(data, dtype=meta["dtype"]).reshape(meta["shape"])
        grey = picture if picture.ndim == 2 else cv2.cvtColor(picture, cv2.COLOR_RGB2GRAY)
    else:  # encoded bytes: infer
        grey = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        connector.send_response({"error": "not a picture OpenCV can read"}, response)
        continue
    found = cascade.detectMultiScale(grey, scaleFactor=float(param.get("scale", 1.1)),
                                     minNeighbors=int(param.get("neighbours", 5)), minSize=(40, 40))
    boxes = [{"x": int(x), "y": int(y), "w": int(w), "h": int(h)} for x, y, w, h in found]
    connector.send_response({"faces": boxes, "size": list(grey.shape[::-1])}, response)
