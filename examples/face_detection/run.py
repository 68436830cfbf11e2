"""Detect the faces in a real photograph on a Docker board.

With a manager running that has a board with a Docker engine (`make test`'s set-up, or
`make images`, builds the images; the manager's default board "local" uses this machine's
engine):

    python examples/face_detection/run.py [--board local] [--port 5570]

It builds the face detector's image from image.toml (once; seconds after), deploys it,
sends scikit-image's astronaut photograph, prints the boxes, and removes the inference.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from photo import photo  # noqa: E402

from infinibrain import AICluster, ContainerConfig, imagebuild  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--board", default="local")
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args()
    spec = imagebuild.load_spec(HERE / "image.toml")
    built = imagebuild.build(spec)
    print(f"image {built.tag}: {built.size / 1e6:.0f} MB")
    with AICluster(port=args.port) as cluster:
        cluster.load_inference(ContainerConfig(name="faces", implementation_type="docker", image_tag=spec.tag,
                                               input="Main", output="Main"), args.board)
        try:
            started = time.perf_counter()
            result, _ = cluster.infer("faces", photo())
            ms = (time.perf_counter() - started) * 1000
            print(f"astronaut.png ({result['size'][0]}x{result['size'][1]}): {len(result['faces'])} face(s) in {ms:.0f} ms")
            for box in result["faces"]:
                print(f"  face at x={box['x']} y={box['y']} size {box['w']}x{box['h']}")
        finally:
            cluster.unload_inference("faces", delete_image=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
