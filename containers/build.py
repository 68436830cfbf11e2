"""Build infinibrain's container images offline: ``python containers/build.py`` (``make images``).

No image registry is reachable, so nothing is pulled:

1. ``infinibrain/base`` — a Debian root file system made with debootstrap from Debian's
   package archive (python3, numpy, pyzmq, msgpack) and ``docker import``-ed. The root file
   system is cached as a tar under ``$INFINIBRAIN_CACHE`` (default ``~/.cache/infinibrain``),
   and the imported image is tagged with a hash of its recipe: a rebuild with an unchanged
   recipe reuses the image on the engine, or re-imports the cached tar, and never runs
   debootstrap again.
2. ``infinibrain/runtime`` — ``FROM`` the base, with the ``infinibrain`` package (its
   ``infinibrain.containers`` library and the wire protocol) from this checkout.
3. ``infinibrain/example-classifier`` — ``FROM infinibrain/runtime``, the example inference
   of ``examples/models/classifier`` with weights generated at build time.

Images 2 and 3 are built by the engine's own builder from a context assembled here (only
the files the Dockerfile needs), so its layer cache makes a rebuild take seconds.
``--save DIR`` also writes each image as a ``docker save`` tar, the form ``load_inference``
loads from ``image_path``/``image_filename``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import docker

log = logging.getLogger("infinibrain.build")

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "containers"

SUITE = "bookworm"
PACKAGES = ["python3", "python3-cffi-backend", "python3-zmq", "python3-msgpack", "python3-numpy"]
# What a container never needs; removing it makes the image about half the size.
TRIM = [
    "var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
    "usr/share/info", "usr/share/locale", "var/log",
]
RECIPE_VERSION = 1  # bump when the way the root file system is made changes

BASE = "infinibrain/base"
RUNTIME = "infinibrain/runtime:latest"
EXAMPLE = "infinibrain/example-classifier:latest"


def recipe_hash() -> str:
    recipe = {"suite": SUITE, "packages": sorted(PACKAGES), "trim": TRIM, "version": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def cache_dir() -> Path:
    path = Path(os.environ.get("INFINIBRAIN_CACHE") or Path.home() / ".cache" / "infinibrain")
    path.mkdir(parents=True, exist_ok=True)
    return path


def has_image(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


# ---- 1. the base image -------------------------------------------------------------------

def make_rootfs(target: Path) -> None:
    """debootstrap a minimal Debian with Python's packages into ``target`` and trim it."""
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is not installed (apt-get install debootstrap)")
    mirror = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(target), mirror]
    log.info("debootstrap %s from %s (about a minute)", SUITE, mirror)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    for rel in TRIM:
        path = target / rel
        if path.is_dir():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()


def rootfs_tar() -> Path:
    """The cached root file system tar, made if missing."""
    tar = cache_dir() / f"base-{SUITE}-{recipe_hash()}.tar"
    if tar.exists():
        log.info("reusing cached root file system %s", tar)
        return tar
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="rootfs.") as tmp:
        root = Path(tmp) / "root"
        make_rootfs(root)
        partial = tar.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], check=True)
        partial.rename(tar)  # a cut-off run leaves no tar that looks complete
    return tar


def build_base(client: docker.DockerClient) -> str:
    tag = f"{BASE}:{SUITE}-{recipe_hash()}"
    if has_image(client, tag):
        log.info("base image %s is up to date", tag)
    else:
        tar = rootfs_tar()
        log.info("importing %s as %s", tar.name, tag)
        client.api.import_image(
            src=str(tar),
            repository=BASE,
            tag=f"{SUITE}-{recipe_hash()}",
            changes=["ENV LANG=C.UTF-8", "ENV PYTHONUNBUFFERED=1", 'CMD ["python3"]'],
        )
    client.images.get(tag).tag(BASE, "latest")
    return tag


# ---- 2. and 3. images built on it --------------------------------------------------------

def context_tar(files: dict[str, Path]) -> io.BytesIO:
    """A build context holding ``files`` (name in the context -> file or folder here)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, path in files.items():
            tar.add(path, arcname=name, filter=_reproducible)
    buf.seek(0)
    return buf


def _reproducible(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    # The builder's cache keys on content and metadata: fixed times and owners keep a
    # rebuild of unchanged files a cache hit.
    if "__pycache__" in info.name or info.name.endswith((".pyc", "weights.npz")):
        return None
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def build(client: docker.DockerClient, tag: str, files: dict[str, Path], buildargs: dict | None = None) -> None:
    started = time.monotonic()
    stream = client.api.build(
        fileobj=context_tar(files),
        custom_context=True,
        tag=tag,
        rm=True,
        forcerm=True,
        network_mode="none",  # nothing in a build may reach a network
        buildargs=buildargs or {},
        decode=True,
    )
    for chunk in stream:
        if "error" in chunk:
            raise SystemExit(f"building {tag} failed: {chunk['error'].strip()}")
        text = (chunk.get("stream") or "").strip()
        if text:
            log.debug("%s: %s", tag, text)
    log.info("built %s in %.1f s", tag, time.monotonic() - started)


def build_runtime(client: docker.DockerClient, base_tag: str) -> None:
    build(
        client,
        RUNTIME,
        {"Dockerfile": HERE / "runtime" / "Dockerfile", "infinibrain": ROOT / "infinibrain"},
        {"BASE": base_tag},
    )


def build_example(client: docker.DockerClient) -> None:
    models = ROOT / "examples" / "models"
    build(
        client,
        EXAMPLE,
        {
            "Dockerfile": HERE / "examples" / "classifier" / "Dockerfile",
            "classifier": models / "classifier",
            "make_weights.py": models / "make_weights.py",
        },
    )


def save(client: docker.DockerClient, tag: str, folder: Path) -> Path:
    """Write ``tag`` as a ``docker save`` tar into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / (tag.split("/")[-1].replace(":", "_") + ".tar")
    partial = out.with_suffix(".partial")
    with open(partial, "wb") as fh:
        for chunk in client.images.get(tag).save(named=True):
            fh.write(chunk)
    partial.rename(out)
    log.info("saved %s to %s (%.0f MB)", tag, out, out.stat().st_size / 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", metavar="DIR", type=Path, help="also write each image as a docker save tar into DIR")
    parser.add_argument("--no-example", action="store_true", help="build only the base and runtime images")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="build: %(message)s")
    try:
        client = docker.from_env(version="auto", timeout=600)
        client.ping()
    except docker.errors.DockerException as exc:
        log.error("no Docker engine answers (%s); start one with scripts/engine.sh start", exc)
        return 1
    started = time.monotonic()
    base = build_base(client)
    build_runtime(client, base)
    tags = [RUNTIME]
    if not args.no_example:
        build_example(client)
        tags.append(EXAMPLE)
    if args.save:
        for tag in tags:
            save(client, tag, args.save)
    log.info("images ready in %.1f s: %s", time.monotonic() - started, ", ".join([base, *tags]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
