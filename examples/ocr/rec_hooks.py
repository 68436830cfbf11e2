"""Hooks of the text recognizer (PP-OCRv4 rec, served from rec.onnx by the built-in runner).

setup: the model's alphabet, which PP-OCR keeps in the model file's metadata.
preprocess: a crop of one text line, RGB (H, W, 3) uint8 -> [1, 3, 48, 320] float32
(height 48, width by its aspect ratio up to 320, padded; normalised to -1..1), so that
crops batch together. postprocess: greedy CTC decoding -> {"text", "score"}.
"""
import numpy as np
from PIL import Image

HEIGHT, WIDTH = 48, 320
CHARS = []


def setup(session):
    CHARS[:] = ["blank", *session.get_modelmeta().custom_metadata_map["character"].splitlines(), " "]


def preprocess(crop, param):
    h, w = crop.shape[:2]
    width = min(WIDTH, max(1, int(np.ceil(HEIGHT * w / h))))
    line = np.asarray(Image.fromarray(np.ascontiguousarray(crop[..., :3])).resize((width, HEIGHT), Image.Resampling.BILINEAR))
    padded = np.zeros((3, HEIGHT, WIDTH), np.float32)
    padded[:, :, :width] = ((line.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)
    return padded[np.newaxis]


def postprocess(outputs, param):
    probs = next(iter(outputs.values()))[0]  # [T, classes]
    best, conf = probs.argmax(axis=1), probs.max(axis=1)
    keep = (best != 0) & np.concatenate([[True], best[1:] != best[:-1]])
    text = "".join(CHARS[i] for i in best[keep])
    return {"text": text, "score": round(float(conf[keep].mean()), 4) if keep.any() else 0.0}
