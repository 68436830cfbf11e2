"""Hooks of the text detector (PP-OCRv4 det, served from det.onnx by the built-in runner).

preprocess: an RGB image (H, W, 3) uint8 -> [1, 3, H', W'] float32, scaled so its longer
side is at most 960 and both sides are multiples of 32, normalised to -1..1 (PaddleOCR's).
postprocess: the probability map -> {"boxes": [[x0, y0, x1, y1], ...], "scores": [...]}
in the original image's pixels: horizontal text lines, found from the map's row and column
profiles (no OpenCV in the image), each grown as PaddleOCR's unclip ratio does.
"""
import numpy as np
from PIL import Image

LIMIT = 960
THRESH, BOX_THRESH, UNCLIP = 0.3, 0.5, 1.6


def preprocess(image, param):
    h, w = image.shape[:2]
    scale = min(1.0, LIMIT / max(h, w))
    nh, nw = max(32, round(h * scale / 32) * 32), max(32, round(w * scale / 32) * 32)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image[..., :3])).resize((nw, nh), Image.Resampling.BILINEAR))
    param["_size"] = [h, w, nh, nw]  # for postprocess: the original size and the model's
    return ((resized.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[np.newaxis]


def _runs(flags, gap):
    """[start, end) of the runs of True in ``flags``, joining runs less than ``gap`` apart."""
    runs, start, last = [], None, -gap - 1
    for i in np.flatnonzero(flags):
        if start is None:
            start = i
        elif i - last > gap:
            runs.append((start, last + 1))
            start = i
        last = i
    if start is not None:
        runs.append((start, last + 1))
    return runs


def postprocess(outputs, param):
    prob = next(iter(outputs.values()))[0, 0]
    h, w, nh, nw = param.pop("_size")
    mask = prob > THRESH
    boxes, scores = [], []
    for y0, y1 in _runs(mask.any(axis=1), 1):
        for x0, x1 in _runs(mask[y0:y1].any(axis=0), max(y1 - y0, 4)):
            score = float(prob[y0:y1, x0:x1][mask[y0:y1, x0:x1]].mean())
            if score < BOX_THRESH or x1 - x0 < 3 or y1 - y0 < 3:
                continue
            grow = (x1 - x0) * (y1 - y0) * UNCLIP / (2 * ((x1 - x0) + (y1 - y0)))
            box = [(x0 - grow) * w / nw, (y0 - grow) * h / nh, (x1 + grow) * w / nw, (y1 + grow) * h / nh]
            boxes.append([int(max(0, box[0])), int(max(0, box[1])), int(min(w, box[2])), int(min(h, box[3]))])
            scores.append(round(score, 4))
    return {"boxes": boxes, "scores": scores}
