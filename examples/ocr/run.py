"""Read the text in a picture with PP-OCR's detector and recognizer, each served from its
model file by the built-in runner, and a small pipeline script that calls them.

    python examples/ocr/run.py [--board NAME] [--type process|docker] [--image PNG]

Needs a running manager (`infinibrain-manager`); a docker board uses the image
infinibrain/ocr:1 (examples/ocr/image.toml, built by `make test`). With no --image it reads a picture of
"HELLO 2026" drawn here with Pillow.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ppocr import fetch, text_image  # noqa: E402

from infinibrain import AICluster, ContainerConfig, InferenceModulesConfig  # noqa: E402


def configs(kind: str, models: Path, prefix: str = "ocr") -> list[ContainerConfig]:
    """The three inferences: det and rec from their model files (hooks around them), and
    the pipeline that calls them. A process board gets the files from this folder and the
    model cache; a docker board finds them in infinibrain/ocr:1 (image.toml)."""
    if kind in ("docker", "nvidia"):
        files: dict = {"image_tag": "infinibrain/ocr:1"}
        where = "/app/models"
    else:
        files = {"script_path": str(HERE), "copy": [{"From": str(models / f"{n}.onnx"), "To": "/models/"} for n in ("det", "rec")]}
        where = "/models"

    def model(name: str) -> ContainerConfig:
        return ContainerConfig(name=f"{prefix}-{name}", implementation_type=kind, input="Main", output="Main",
                               inference_modules=InferenceModulesConfig(sub_inference_name=name, model=f"{where}/{name}.onnx",
                                                                        model_tag="PP-OCRv4", hooks=f"{name}_hooks.py"),
                               ready_timeout=120_000, **files)

    pipeline = ContainerConfig(name=prefix, implementation_type=kind, input="Main", output="Main", run_command="python3 pipeline.py",
                               run_option=f"-e OCR_DET={prefix}-det -e OCR_REC={prefix}-rec", **files)
    return [model("det"), model("rec"), pipeline]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--board", default="local")
    parser.add_argument("--type", default="process", choices=["process", "docker", "nvidia"])
    parser.add_argument("--image", type=Path, help="a picture with text (PNG, JPEG)")
    args = parser.parse_args()
    if args.image:
        from PIL import Image
        picture = np.asarray(Image.open(io.BytesIO(args.image.read_bytes())).convert("RGB"))
    else:
        picture = text_image()
    deployed = configs(args.type, fetch())
    with AICluster() as cluster:
        for cfg in deployed:
            cluster.load_inference(cfg, args.board)
        try:
            started = time.perf_counter()
            result = cluster.infer_image("ocr", picture)
            took = (time.perf_counter() - started) * 1000
            for line in result["lines"]:
                print(f"{line['text']!r}  score {line['score']:.3f}  box {line['box']}")
            print(f"{len(result['lines'])} line(s) in {took:.0f} ms")
        finally:
            for cfg in deployed:
                cluster.unload_inference(cfg.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
