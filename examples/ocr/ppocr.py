"""PP-OCR's real networks, from the PyPI wheel that ships them: rapidocr-onnxruntime's
text detector and recognizer (PaddleOCR's PP-OCRv4, Apache-2.0). The wheel is downloaded
once with pip (no dependencies: only its files are read) and cached; nothing else is
fetched. ``fetch()`` returns the folder holding ``det.onnx`` and ``rec.onnx`` (in the
build cache), and puts a copy in ``examples/ocr/models/`` for the example's image spec.

    python examples/ocr/ppocr.py      # prints the folder
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from infinibrain.imagebuild import cache_dir

WHEEL = "rapidocr-onnxruntime==1.4.4"
MEMBERS = {"det.onnx": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
           "rec.onnx": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"}


HERE = Path(__file__).resolve().parent


def fetch() -> Path:
    folder = cache_dir() / "ppocr"
    folder.mkdir(exist_ok=True)
    if not all((folder / name).exists() for name in MEMBERS):
        _unpack(folder)
    local = HERE / "models"  # for image.toml (not in git)
    local.mkdir(exist_ok=True)
    for name in MEMBERS:
        if not (local / name).exists() or (local / name).stat().st_size != (folder / name).stat().st_size:
            shutil.copyfile(folder / name, local / name)
    return folder


def _unpack(folder: Path) -> None:
    wheels = folder / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "-d", str(wheels), WHEEL], check=True, timeout=600)
    wheel = next(wheels.glob("rapidocr_onnxruntime-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        for name, member in MEMBERS.items():
            partial = folder / (name + ".partial")
            partial.write_bytes(z.read(member))
            partial.rename(folder / name)


def text_image(text: str = "HELLO 2026", size: int = 48) -> "object":
    """A picture of ``text`` (black on white, Pillow's own font), as an RGB uint8 array."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    picture = Image.new("RGB", (right - left + 2 * size, bottom - top + 2 * size), "white")
    ImageDraw.Draw(picture).text((size - left, size - top), text, fill="black", font=font)
    return np.asarray(picture)


if __name__ == "__main__":
    print(fetch())
