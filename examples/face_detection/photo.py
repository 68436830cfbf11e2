"""A real photograph that ships inside a package: scikit-image's astronaut (Eileen Collins,
NASA, public domain), taken from PyPI's scikit-image wheel (downloaded once with pip,
cached); nothing else is fetched. ``photo()`` returns the PNG's bytes."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from infinibrain.imagebuild import cache_dir

WHEEL = "scikit-image==0.25.2"
MEMBER = "skimage/data/astronaut.png"


def cache() -> Path:
    path = cache_dir() / "photos"
    path.mkdir(exist_ok=True)
    return path


def photo() -> bytes:
    png = cache() / "astronaut.png"
    if not png.exists():
        folder = cache() / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux2014_x86_64", "--python-version", "3.11", "--implementation", "cp",
                        "--abi", "cp311", "-d", str(folder), WHEEL], check=True)
        wheel = next(folder.glob("scikit_image-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            partial = png.with_suffix(".partial")
            partial.write_bytes(z.read(MEMBER))
            partial.rename(png)
    return png.read_bytes()


if __name__ == "__main__":
    data = photo()
    print(f"{cache() / 'astronaut.png'}: {len(data)} bytes")
